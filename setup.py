"""Builds csrc/ into the extension module ``fastft._cuda`` with nvcc + pybind11.

Everything else about the package lives in pyproject.toml. The build never looks for a
GPU: architectures come from FASTFT_CUDA_ARCHS, so wheels build on GPU-less machines.

    FASTFT_CUDA=auto  build when nvcc is found; on failure warn and ship without it
                      (no nvcc at all: a pure-Python wheel, as with 0)
    FASTFT_CUDA=0     never build (pure-Python wheel)
    FASTFT_CUDA=1     must build; any failure fails the install
    FASTFT_CUDA_ARCHS="80;90a"   SM architectures to compile for; "80+PTX" also embeds
                      PTX for compute_80 so newer GPUs can JIT it (not for "a" archs,
                      whose PTX only runs on that exact architecture)
    MAX_JOBS=N        parallel nvcc processes (default: CPU count)

The module links the CUDA runtime statically and hides every symbol but PyInit__cuda,
so it neither depends on nor interposes with the libcudart that torch loads.
"""

import datetime
import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import time
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
for _arch in ARCHS:
    _number = _arch.removesuffix("+PTX").removesuffix("a")
    if not _number.isdigit() or (_arch.endswith("+PTX") and _arch.removesuffix("+PTX").endswith("a")):
        sys.exit(f"FASTFT_CUDA_ARCHS entries look like 80, 90a or 80+PTX; got {_arch!r}")


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
        # A module left in build/ by an earlier build must not ship if this one fails.
        out_path.unlink(missing_ok=True)
        info = {"mode": MODE, "archs": ARCHS, "built": False, "error": None,
                "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
        started = time.monotonic()
        nvcc = find_nvcc()
        if nvcc is None:
            info["error"] = "nvcc not found (set CUDA_HOME or put nvcc on PATH)"
        else:
            try:
                version = subprocess.run([nvcc, "--version"], capture_output=True, text=True, check=True).stdout
                info["nvcc"] = version.strip().splitlines()[-1]
                # The static runtime needs a driver for this CUDA major version at run time.
                release = re.search(r"release (\d+\.\d+)", version)
                info["cuda_version"] = release.group(1) if release else None
                self._compile_and_link(nvcc, out_path)
                info["built"] = True
            except (subprocess.CalledProcessError, OSError, ImportError) as err:
                info["error"] = f"nvcc build failed: {err}"
            info["build_seconds"] = round(time.monotonic() - started, 1)
        self._write_build_info(out_path, info)
        if not info["built"]:
            if MODE == "1":
                raise RuntimeError(f"FASTFT_CUDA=1 but the CUDA extension did not build: {info['error']}")
            print(f"warning: fastft._cuda not built ({info['error']}); Triton and torch backends only",
                  file=sys.stderr)

    def _compile_and_link(self, nvcc, out_path):
        import pybind11

        # Every op's sources wherever they sit under csrc/ (csrc/<op>/*.cu, *.cpp), largest
        # first: with few cores the longest compile should not be the one started last.
        sources = sorted([*CSRC.rglob("*.cu"), *CSRC.rglob("*.cpp")], key=lambda p: (-p.stat().st_size, str(p)))
        if not (CSRC / "bindings.cpp").exists():  # e.g. an sdist made without MANIFEST.in's csrc/ line
            raise OSError(f"no CUDA sources: {CSRC / 'bindings.cpp'} is missing")
        obj_dir = Path(self.build_temp) / "csrc"
        obj_dir.mkdir(parents=True, exist_ok=True)
        gencode = []
        for arch in ARCHS:
            number = arch.removesuffix("+PTX")
            codes = f"[sm_{number},compute_{number}]" if arch.endswith("+PTX") else f"sm_{number}"
            gencode += ["-gencode", f"arch=compute_{number},code={codes}"]
        # -fvisibility=hidden: only PyInit__cuda (marked visible by pybind11) is exported.
        common = ["-O3", "-std=c++17", "--expt-relaxed-constexpr",
                  "-Xcompiler", "-fPIC", "-Xcompiler", "-fvisibility=hidden",
                  "-I", str(CSRC), "-I", pybind11.get_include(), "-I", sysconfig.get_paths()["include"]]

        def compile_one(src):
            obj = obj_dir / (str(src.relative_to(CSRC)).replace(os.sep, "_") + ".o")
            cmd = [nvcc, "-c", str(src), "-o", str(obj), *common, *gencode]
            print(" ".join(cmd), flush=True)
            compile_started = time.monotonic()
            result = subprocess.run(cmd, capture_output=True, text=True)
            if result.stdout or result.stderr:  # errors, and warnings worth seeing in CI logs
                print(result.stdout + result.stderr, file=sys.stderr, flush=True)
            if result.returncode != 0:
                raise subprocess.CalledProcessError(result.returncode, cmd, result.stdout, result.stderr)
            print(f"compiled {src.relative_to(CSRC)} in {time.monotonic() - compile_started:.1f} s", flush=True)
            return obj

        jobs = int(os.environ.get("MAX_JOBS", os.cpu_count() or 1))
        with ThreadPoolExecutor(max_workers=jobs) as pool:
            objects = list(pool.map(compile_one, sources))
        out_path.parent.mkdir(parents=True, exist_ok=True)
        # --exclude-libs,ALL makes the static cudart's symbols local to this module:
        # otherwise they could bind to (or be overridden by) the cudart torch loads with
        # RTLD_GLOBAL, mixing two runtime versions.
        link = [nvcc, "-shared", "-cudart", "static", "-Xlinker", "--exclude-libs,ALL", *gencode,
                "-o", str(out_path), *map(str, objects)]
        print(" ".join(link), flush=True)
        subprocess.run(link, check=True)

    def copy_extensions_to_source(self):
        # Editable installs build in a temporary build_lib and copy only the .so back into
        # the source tree; the build record must follow it or `fastft info` cannot say
        # which architectures were built.
        super().copy_extensions_to_source()
        package_dir = Path(self.get_finalized_command("build_py").get_package_dir("fastft"))
        built = Path(self.build_lib) / "fastft" / "_build_info.json"
        if built.exists():
            self.copy_file(str(built), str(package_dir / "_build_info.json"), level=self.verbose)

    def _write_build_info(self, out_path, info):
        # Next to the module, so an installed package and an in-place build both find it.
        path = out_path.parent / "_build_info.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(info, indent=2) + "\n")


# auto without a toolkit: no extension at all, so the wheel is pure Python (py3-none-any)
# rather than a platform wheel that carries no binary.
WANT_EXTENSION = MODE == "1" or (MODE == "auto" and find_nvcc() is not None)
ext_modules = [Extension("fastft._cuda", sources=[])] if WANT_EXTENSION else []
setup(ext_modules=ext_modules, cmdclass={"build_ext": NvccBuildExt})
