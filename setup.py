"""Builds csrc/ into the extension module ``fastft._cuda`` with nvcc + pybind11.

Everything else about the package lives in pyproject.toml. The build never looks for a
GPU: architectures come from FASTFT_CUDA_ARCHS, so wheels build on GPU-less machines.

    FASTFT_CUDA=auto  build when nvcc is found; on failure warn and ship without it
    FASTFT_CUDA=0     never build (pure-Python wheel)
    FASTFT_CUDA=1     must build; any failure fails the install
    FASTFT_CUDA_ARCHS="80;90a"   SM architectures to compile for
"""

import datetime
import json
import os
import shutil
import subprocess
import sys
import sysconfig
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).parent.resolve()
CSRC = ROOT / "csrc"
MODE = os.environ.get("FASTFT_CUDA", "auto").strip().lower()
ARCHS = [a.strip() for a in os.environ.get("FASTFT_CUDA_ARCHS", "80;90a").split(";") if a.strip()]

if MODE not in ("auto", "0", "1"):
    sys.exit(f"FASTFT_CUDA must be auto, 0 or 1, not {MODE!r}")


def find_nvcc():
    for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if home and (Path(home) / "bin" / "nvcc").exists():
            return str(Path(home) / "bin" / "nvcc")
    return shutil.which("nvcc")


class NvccBuildExt(build_ext):
    """Compiles every csrc/**/*.cu and csrc/*.cpp with nvcc and links with the static
    CUDA runtime (no libtorch), then records what happened in fastft/_build_info.json."""

    def build_extension(self, ext):
        out_path = Path(self.get_ext_fullpath(ext.name))
        info = {"mode": MODE, "archs": ARCHS, "built": False, "error": None,
                "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
        nvcc = find_nvcc()
        if nvcc is None:
            info["error"] = "nvcc not found (set CUDA_HOME or put nvcc on PATH)"
        else:
            try:
                info["nvcc"] = subprocess.run([nvcc, "--version"], capture_output=True, text=True,
                                              check=True).stdout.strip().splitlines()[-1]
                self._compile_and_link(nvcc, out_path)
                info["built"] = True
            except (subprocess.CalledProcessError, OSError) as err:
                info["error"] = f"nvcc build failed: {err}"
        self._write_build_info(out_path, info)
        if not info["built"]:
            if MODE == "1":
                raise RuntimeError(f"FASTFT_CUDA=1 but the CUDA extension did not build: {info['error']}")
            print(f"warning: fastft._cuda not built ({info['error']}); Triton and torch backends only",
                  file=sys.stderr)

    def _compile_and_link(self, nvcc, out_path):
        import pybind11

        sources = sorted(CSRC.rglob("*.cu")) + sorted(CSRC.glob("*.cpp"))
        obj_dir = Path(self.build_temp) / "csrc"
        obj_dir.mkdir(parents=True, exist_ok=True)
        gencode = []
        for arch in ARCHS:
            gencode += ["-gencode", f"arch=compute_{arch},code=sm_{arch}"]
        common = ["-O3", "-std=c++17", "--expt-relaxed-constexpr", "-Xcompiler", "-fPIC",
                  "-I", str(CSRC), "-I", pybind11.get_include(), "-I", sysconfig.get_paths()["include"]]

        def compile_one(src):
            obj = obj_dir / (str(src.relative_to(CSRC)).replace(os.sep, "_") + ".o")
            cmd = [nvcc, "-c", str(src), "-o", str(obj), *common, *gencode]
            print(" ".join(cmd), flush=True)
            result = subprocess.run(cmd, capture_output=True, text=True)
            if result.returncode != 0:
                print(result.stdout + result.stderr, file=sys.stderr)
                raise subprocess.CalledProcessError(result.returncode, cmd, result.stdout, result.stderr)
            return obj

        jobs = int(os.environ.get("MAX_JOBS", os.cpu_count() or 1))
        with ThreadPoolExecutor(max_workers=jobs) as pool:
            objects = list(pool.map(compile_one, sources))
        out_path.parent.mkdir(parents=True, exist_ok=True)
        link = [nvcc, "-shared", "-cudart", "static", *gencode, "-o", str(out_path), *map(str, objects)]
        print(" ".join(link), flush=True)
        subprocess.run(link, check=True)

    def _write_build_info(self, out_path, info):
        # Next to the module, so an installed package and an in-place build both find it.
        path = out_path.parent / "_build_info.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(info, indent=2) + "\n")


ext_modules = [] if MODE == "0" else [Extension("fastft._cuda", sources=[])]
setup(ext_modules=ext_modules, cmdclass={"build_ext": NvccBuildExt})
