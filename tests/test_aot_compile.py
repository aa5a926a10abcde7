"""Every Triton kernel and autotune config, compiled ahead of time for sm_80 and sm_90.

No GPU is needed: ``python -m fastft.kernels.aot`` (kernels/aot.py) runs the real host
launchers on meta tensors of realistic shapes under a stand-in driver per architecture,
so each kernel compiles every config its pruning keeps there, with the specialisation a
real launch gets. A config fails when its shared memory exceeds what a block may use on
that architecture or it spills registers beyond ``SPILL_BUDGET`` (bytes of stack frame per
thread). Runs in its own process (the kernels must be imported without the interpreter).

The same check runs with a second Triton when ``FASTFT_AOT_PYTHON`` names a Python that
has it (``.ci/run`` makes one with the GPU image's Triton 3.6 when its wheel installs).
Compiles are cached by Triton (``TRITON_CACHE_DIR``, default ~/.triton/cache): the first
run on a machine costs minutes (benchmarks/NOTES.md gives the measured time), later runs
seconds. So the two compile tests carry the marker ``aot``, which the default run leaves
out; ``.ci/run`` runs them as its own step (``python -m pytest -m aot``).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

# Every kernel the launchers start, on both architectures.
KERNELS = {
    "_linear_cross_entropy_fwd_kernel", "_linear_cross_entropy_bwd_kernel",
    "_attention_fwd_kernel", "_attention_bwd_delta_kernel", "_attention_bwd_dkdv_kernel", "_attention_bwd_dq_kernel",
    "_lora_fused_linear_kernel", "_lora_masked_matmul_kernel",
}
ARCHS = ("80", "90")


def compile_ahead_of_time(python: str, tmp_path, archs=ARCHS) -> dict:
    out = tmp_path / "aot.json"
    env = {**os.environ, "TRITON_INTERPRET": "0", "TRITON_DEFAULT_FP_FUSION": "1", "PYTHONUNBUFFERED": "1"}
    jobs = str(min(4, os.cpu_count() or 1))
    proc = subprocess.run([python, "-m", "fastft.kernels.aot", "--arch", *archs, "--jobs", jobs, "--json", str(out)],
                          capture_output=True, text=True, env=env, timeout=3000)
    assert out.exists(), f"the compile did not finish (exit {proc.returncode}):\n{proc.stdout[-4000:]}{proc.stderr[-4000:]}"
    result = json.loads(out.read_text())
    table = proc.stdout[-12000:]
    over = [k for k in result["kernels"]
            if k["stack_bytes"] > result["spill_budget"]
            or k["shared_bytes"] > result["shared_limit"].get(str(k["arch"]), float("inf"))]
    assert not over, f"{len(over)} configs over the limits (triton {result['triton']}):\n{table}"
    assert proc.returncode == 0, table + proc.stderr[-4000:]
    compiled = {(k["kernel"], str(k["arch"])) for k in result["kernels"]}
    missing = {(kernel, arch) for kernel in KERNELS for arch in archs} - compiled
    assert not missing, f"never compiled: {sorted(missing)}"
    return result


@pytest.mark.aot
def test_every_triton_config_compiles_for_sm80_and_sm90(tmp_path):
    result = compile_ahead_of_time(sys.executable, tmp_path)
    assert len(result["kernels"]) >= 2 * len(KERNELS)


@pytest.mark.aot
def test_every_triton_config_compiles_with_the_gpu_images_triton(tmp_path):
    """sm_90 only: the image's GPU (an H200); the current Triton covers sm_80 above."""
    python = os.environ.get("FASTFT_AOT_PYTHON")
    if not python:
        pytest.skip("FASTFT_AOT_PYTHON is not set (.ci/run sets it to a Python with the GPU image's Triton 3.6)")
    result = compile_ahead_of_time(python, tmp_path, archs=("90",))
    expected = os.environ.get("FASTFT_AOT_TRITON", "3.6")
    assert result["triton"].startswith(expected), result["triton"]


# --------------------------------------------------------------------------- config selection (no compile)


def test_configs_follow_the_target_architecture_and_the_one_config_switch(monkeypatch):
    from fastft.kernels import _autotune

    both = _autotune.config({"BLOCK": 128}, 8, 3)
    hopper = _autotune.config({"BLOCK": 256}, 8, 3, archs=(90,))
    ampere = _autotune.config({"BLOCK": 64}, 4, 3, archs=(80,))
    configs = [hopper, both, ampere]
    monkeypatch.delenv("FASTFT_TRITON_CONFIGS", raising=False)
    monkeypatch.setattr(_autotune, "target_family", lambda: 90)
    assert _autotune.for_target(configs) == [hopper, both]
    monkeypatch.setattr(_autotune, "target_family", lambda: 80)
    assert _autotune.for_target(configs) == [both, ampere]
    monkeypatch.setenv("FASTFT_TRITON_CONFIGS", "first")
    assert _autotune.for_target(configs) == [both]


def test_attention_configs_fit_the_head_dim(monkeypatch):
    from fastft.kernels import _autotune
    from fastft.kernels import attention as kernels

    big = _autotune.config({"BLOCK_M": 128, "BLOCK_N": 128}, 8, 2, archs=(90,), fits={90: (64, 128)},
                           fits_extra={90: (64,)})
    small = _autotune.config({"BLOCK_M": 32, "BLOCK_N": 32}, 4, 2, fits={80: (64, 96, 128, 256), 90: (64, 96, 128, 256)},
                             fits_extra={80: (64, 96, 128, 256), 90: (64, 96, 128, 256)})

    def prune(main, tail=0, **flags):
        return kernels._prune_for_head_dim([big, small], {"HEAD_DIM_MAIN": main, "HEAD_DIM_TAIL": tail, **flags})

    monkeypatch.delenv("FASTFT_TRITON_CONFIGS", raising=False)
    monkeypatch.setattr(kernels, "target_family", lambda: 90)
    assert prune(64) == [big, small] and prune(16) == [big, small]  # head_dim <= 64: class 64
    assert prune(256) == [small]
    assert prune(64, 32) == [small]  # head_dim 96 (split): listed for 96 only
    assert prune(128) == [big, small] and prune(128, HAS_SOFTCAP=True) == [small]  # the extra feature class
    assert prune(64, WINDOW_LEFT=True) == [big, small] and prune(64, HAS_ALIBI=True) == [big, small]
    monkeypatch.setattr(kernels, "target_family", lambda: 80)
    assert prune(16) == [small]
    monkeypatch.setenv("FASTFT_TRITON_CONFIGS", "first")
    monkeypatch.setattr(kernels, "target_family", lambda: 90)
    assert prune(128) == [big]


def test_attention_config_tables_cover_every_class():
    """On each architecture, every head-dim class and feature class has a config listed
    (else the last config would run unchecked)."""
    from fastft.kernels import attention as kernels

    for configs in (kernels.FWD_CONFIGS, kernels.BWD_KV_CONFIGS, kernels.BWD_Q_CONFIGS):
        for arch in (80, 90):
            for tag in ("fits", "fits_extra"):
                covered = {c for config in configs for c in getattr(config, tag).get(arch, ())}
                assert covered == set(kernels.HEAD_DIM_CLASSES), (configs[0].kwargs, arch, tag, covered)


def test_loss_configs_that_spill_with_options_are_left_out_then(monkeypatch):
    """A loss config tagged ``options=False`` (it spills with class weights / softcap) is
    pruned for such calls only, and those flags are part of the autotune key."""
    import torch

    from fastft.kernels import linear_cross_entropy as kernels

    monkeypatch.delenv("FASTFT_TRITON_CONFIGS", raising=False)
    monkeypatch.setattr(kernels, "for_target", lambda configs: configs)  # the architecture filter is tested above
    configs = [kernels._config(128, 64, 64, 4, 3, "16bit", options=False), kernels._config(64, 64, 64, 4, 4, "16bit")]
    hidden = torch.empty(2, 2, dtype=torch.bfloat16)
    assert kernels._configs_for_dtype(configs, {"Hidden": hidden}, HAS_CLASS_WEIGHTS=False, HAS_SOFTCAP=False) == configs
    for flags in ({"HAS_CLASS_WEIGHTS": True, "HAS_SOFTCAP": False}, {"HAS_CLASS_WEIGHTS": False, "HAS_SOFTCAP": True}):
        assert kernels._configs_for_dtype(configs, {"Hidden": hidden}, **flags) == configs[1:]
    for kernel in (kernels._linear_cross_entropy_fwd_kernel, kernels._linear_cross_entropy_bwd_kernel):
        assert {"HAS_CLASS_WEIGHTS", "HAS_SOFTCAP"} <= set(kernel.keys)
