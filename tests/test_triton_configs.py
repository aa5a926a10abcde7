"""Every autotune config of every Triton kernel, forced once on a ragged shape, on a GPU.

A tiny test shape makes the autotuner pick whatever config is fastest for it, so the
other configs never run in the op tests; each config here runs alone (the autotuner then
has nothing to choose) on sizes that are multiples of no block size, and the op's result
is compared with the fp32 reference by the tolerance rule. Which configs exist per
architecture, and that none spills or overflows shared memory, is checked without a GPU
by tests/test_aot_compile.py.
"""

from __future__ import annotations

import contextlib

import pytest
import torch

pytestmark = pytest.mark.gpu


@contextlib.contextmanager
def only_config(kernel, config):
    """Run ``kernel`` (a triton Autotuner) with ``config`` alone."""
    saved = kernel.configs, kernel.cache, kernel.early_config_prune
    kernel.configs, kernel.cache, kernel.early_config_prune = [config], {}, None
    try:
        yield
    finally:
        kernel.configs, kernel.cache, kernel.early_config_prune = saved


def target_configs(kernel, **tags):
    from fastft.kernels._autotune import target_family

    family = target_family()
    return [c for c in kernel.configs if family in getattr(c, "archs", (family,))
            and all(getattr(c, k, v) in (v, "any") for k, v in tags.items())]


def _attention_case(dtype, head_dim, extra):
    from test_attention import check_against_reference, make_qkv

    qkv = make_qkv(2, 6, 2, 333, 391, head_dim, dtype, device="cuda")
    mask = torch.rand(2, 391, device="cuda") > 0.2
    options = dict(causal=True, key_padding_mask=mask, dropout_p=0.1, dropout_seed=3, with_lse=True)
    if extra:  # the feature class the kernels prune separately (fits_extra): window, softcap, ALiBi
        options.update(window=(150, -1), causal_alignment="bottom-right", softcap=20.0,
                       alibi_slopes=torch.rand(2, 6, device="cuda"))
    check_against_reference("triton", qkv, dtype, **options)


@pytest.mark.parametrize("kernel_name", ["_attention_fwd_kernel", "_attention_bwd_dkdv_kernel",
                                         "_attention_bwd_dq_kernel"])
@pytest.mark.parametrize("head_dim", [64, 96, 128, 256])
@pytest.mark.parametrize("extra", [False, True], ids=["base", "extra"])
def test_each_attention_config(monkeypatch, kernel_name, head_dim, extra):
    from fastft.kernels import attention as kernels

    monkeypatch.delenv("FASTFT_TRITON_CONFIGS", raising=False)  # every config, even in a one-config run
    kernel = getattr(kernels, kernel_name)
    main, tail = kernels.head_dim_blocks(head_dim)
    configs = kernels._prune_for_head_dim(kernel.configs, {"HEAD_DIM_MAIN": main, "HEAD_DIM_TAIL": tail,
                                                           "WINDOW_LEFT": extra})
    for config in configs:
        with only_config(kernel, config):
            _attention_case(torch.bfloat16, head_dim, extra)


@pytest.mark.parametrize("kernel_name", ["_linear_cross_entropy_fwd_kernel", "_linear_cross_entropy_bwd_kernel"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_each_loss_config(monkeypatch, kernel_name, dtype):
    monkeypatch.delenv("FASTFT_TRITON_CONFIGS", raising=False)
    from fastft.kernels import linear_cross_entropy as kernels
    from test_linear_cross_entropy import check_against_reference

    kernel = getattr(kernels, kernel_name)
    for config in target_configs(kernel, inputs="fp32" if dtype == torch.float32 else "16bit"):
        with only_config(kernel, config):
            check_against_reference("triton", dtype, 333, 200, 1031, "mean", bias=True, label_smoothing=0.1,
                                    device="cuda")


def test_each_lora_config(monkeypatch):
    monkeypatch.delenv("FASTFT_TRITON_CONFIGS", raising=False)
    from fastft.kernels import lora_linear as kernels
    from test_lora_linear import assert_matches_reference, make_inputs

    kernel = kernels._lora_fused_linear_kernel
    for config in target_configs(kernel):
        with only_config(kernel, config):
            inputs = make_inputs(333, 200, 144, 16, torch.bfloat16, device="cuda", int8=True)
            assert_matches_reference(inputs, dropout_p=0.1, seed=5, backend="triton")
