"""Benchmark: fastft.ops.lora_linear vs PEFT's LoRA layer and the frozen nn.Linear floor.

Side by side in one process, per (tokens, in, out, rank, dropout, weight, pass):
  linear (floor)         frozen nn.Linear alone: what any LoRA layer costs at least
  peft                   peft.tuners.lora.Linear (dropout copy of x, two extra linears, an add)
  torch.compile(peft)    the same layer compiled (GPU only; compile time excluded by warm-up)
  fastft[...]            fastft.ops.lora_linear: `auto` and each GPU backend that can run;
                         on a GPU also the Triton backend with the fused Triton base GEMM
                         (`triton+fused-gemm`) against its cuBLAS-base default: this row
                         decides the design choice documented in kernels/lora_linear.py
  int8 rows              fastft with an int8 base weight (quantize_weight_int8) against
                         `dequant+peft` (dequantise to bf16 on every call, then PEFT) and the
                         bf16 floor

Shapes are projections of real models: BERT-base (768 / 3072), a 1B Llama (2048 / 8192),
Llama-3-8B / Mistral-7B (4096 / 14336). Reported: median ms, speed-up over PEFT, the
overhead over the frozen-linear floor, peak extra memory of the step, the activation
memory held between forward and backward (`saved_MiB`: PEFT keeps a dropped-out copy of
x, fastft only (tokens, r)), and on a GPU the useful TFLOP/s as a fraction of the measured
bf16 matmul peak. Useful FLOPs: forward 2·N·K·O + 2·N·r·(K+O); forward+backward adds
2·N·K·O (dx through the frozen W) and 4·N·r·(K+O) (the rank-r gradients).

    python -m benchmarks.bench_lora_linear [--quick] [--out DIR]
"""

from __future__ import annotations

import contextlib

import torch

from benchmarks.common import OpSuite, Workload, available_backends, bar_chart, run_op_suite, suite_main
from fastft.ops.lora_linear import backend_reasons, lora_linear, quantize_weight_int8

COLUMNS = ["tokens", "in", "out", "rank", "dropout", "weight", "dtype", "pass", "impl", "ms", "speedup_vs_peft",
           "overhead_vs_floor", "peak_extra_MiB", "saved_MiB", "tflops", "frac_matmul_peak", "status"]
LORA_ALPHA_OVER_RANK = 2.0

# (in, out) projections of real models
BERT = [(768, 768), (768, 3072), (3072, 768)]
LLAMA_1B = [(2048, 2048), (2048, 8192)]
LLAMA_8B = [(4096, 4096), (4096, 14336), (14336, 4096)]


def configs(device: torch.device, quick: bool):
    """(tokens, in, out, rank, dropout, weight) to run."""
    if device.type != "cuda":  # reduced CPU set: BERT-base shapes, fp32
        cases = [(2048, 768, 768, 8, 0.1, "float"), (2048, 768, 3072, 16, 0.1, "float")]
        if not quick:
            cases += [(2048, 768, 3072, 16, 0.0, "float"), (2048, 768, 3072, 16, 0.1, "int8")]
        return cases
    cases = []
    main_shapes = BERT + LLAMA_1B + LLAMA_8B
    token_counts = (2048, 16384) if not quick else (8192,)
    for tokens in token_counts:  # the main sweep: rank 16, PEFT's common dropout 0.05
        for k, o in (main_shapes if not quick else [(768, 3072), (2048, 8192), (4096, 4096), (4096, 14336)]):
            cases.append((tokens, k, o, 16, 0.05, "float"))
    for rank in (8, 64):  # rank sweep on the 8B attention projection
        cases.append((8192, 4096, 4096, rank, 0.05, "float"))
    cases.append((8192, 4096, 4096, 16, 0.0, "float"))  # no dropout: cuBLAS-only paths
    for k, o in ([(4096, 4096), (4096, 14336)] if quick else LLAMA_1B + LLAMA_8B):  # int8 base weight
        cases.append((8192, k, o, 16, 0.05, "int8"))
    return list(dict.fromkeys(cases))


FUSED_GEMM_IMPL = "fastft[triton+fused-gemm]"
# The CUDA backend's int8 base GEMM in csrc/lora_linear's WMMA kernel instead of dequantise
# + cuBLAS (its default, fastft/ops/lora_linear_cuda.py INT8_GEMM): the measurement that
# decides that default.
WMMA_INT8_IMPL = "fastft[cuda+wmma-int8]"


@contextlib.contextmanager
def _fused_triton_base_gemm():
    """The Triton backend's 16-bit base GEMM as its own fused kernel instead of cuBLAS, for
    the forward and the backward pass alike (the FUSED_GEMM_IMPL row)."""
    from fastft.kernels import lora_linear as triton_kernels

    previous, triton_kernels.BASE_GEMM = triton_kernels.BASE_GEMM, "triton"
    try:
        yield
    finally:
        triton_kernels.BASE_GEMM = previous


@contextlib.contextmanager
def _wmma_int8_base_gemm():
    """The CUDA backend's int8 base GEMM in its WMMA kernel (the WMMA_INT8_IMPL row)."""
    from fastft.ops import lora_linear_cuda

    previous, lora_linear_cuda.INT8_GEMM = lora_linear_cuda.INT8_GEMM, "fused"
    try:
        yield
    finally:
        lora_linear_cuda.INT8_GEMM = previous


def implementations(device, x, base, lora_a, lora_b, dropout_p, quantized):
    """name -> forward pass of ``x``, all with the same parameters.

    ``quantized``: None, or (int8 weight, scales) of ``base.weight`` for the int8 rows."""
    from peft import LoraConfig
    from peft.tuners.lora.layer import Linear as PeftLinear

    rank = lora_a.shape[0]
    scaling = LORA_ALPHA_OVER_RANK
    config = LoraConfig(r=rank, lora_alpha=int(scaling * rank), lora_dropout=dropout_p)
    peft_layer = PeftLinear(base, "default", config, r=rank, lora_alpha=int(scaling * rank), lora_dropout=dropout_p)
    peft_layer.lora_A["default"].weight = lora_a
    peft_layer.lora_B["default"].weight = lora_b
    peft_layer.to(device=device, dtype=x.dtype).train()
    weight, bias = base.weight, base.bias
    impls = {"linear (floor)": lambda: base(x)}
    if quantized is not None:
        q, scale = quantized

        def dequant_peft():  # what an unfused int8 weight-only layer does each call
            base.weight.data = (q.to(x.dtype) * scale.to(x.dtype)[:, None])
            return peft_layer(x)

        impls["dequant+peft"] = dequant_peft
        impls["fastft"] = lambda: lora_linear(x, q, bias, lora_a, lora_b, scaling, dropout_p=dropout_p,
                                              weight_scale=scale)
        if device.type == "cuda":
            backends = available_backends(backend_reasons(x, q, lora_a, scale, dropout_p), ("cuda", "triton"))
            for backend in backends:
                impls[f"fastft[{backend}]"] = lambda b=backend: lora_linear(
                    x, q, bias, lora_a, lora_b, scaling, dropout_p=dropout_p, weight_scale=scale, backend=b)
            if "cuda" in backends:  # run within _wmma_int8_base_gemm (the workload says so)
                impls[WMMA_INT8_IMPL] = lambda: lora_linear(x, q, bias, lora_a, lora_b, scaling, dropout_p=dropout_p,
                                                            weight_scale=scale, backend="cuda")
        return impls
    impls["peft"] = lambda: peft_layer(x)
    impls["fastft"] = lambda: lora_linear(x, weight, bias, lora_a, lora_b, scaling, dropout_p=dropout_p)
    if device.type == "cuda":
        compiled_peft = torch.compile(peft_layer, dynamic=False)
        impls["torch.compile(peft)"] = lambda: compiled_peft(x)
        backends = available_backends(backend_reasons(x, weight, lora_a, None, dropout_p), ("cuda", "triton"))
        for backend in backends:
            impls[f"fastft[{backend}]"] = lambda b=backend: lora_linear(
                x, weight, bias, lora_a, lora_b, scaling, dropout_p=dropout_p, backend=b)
        if "triton" in backends:  # run within _fused_triton_base_gemm (the workload says so)
            impls[FUSED_GEMM_IMPL] = lambda: lora_linear(x, weight, bias, lora_a, lora_b, scaling,
                                                         dropout_p=dropout_p, backend="triton")
    return impls


def saved_bytes(forward, exclude) -> int:
    """Bytes autograd keeps between forward and backward beyond the inputs / parameters."""
    seen, total = set(), 0
    skip = {t.untyped_storage().data_ptr() for t in exclude}

    def pack(t):
        nonlocal total
        ptr = t.untyped_storage().data_ptr()
        if ptr not in seen and ptr not in skip:
            seen.add(ptr)
            total += t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = forward()
    del out
    return total


def workload(config, device, dtype) -> Workload:
    tokens, in_features, out_features, rank, dropout_p, weight_kind = config
    torch.manual_seed(0)
    x = torch.randn(tokens, in_features, device=device, dtype=dtype, requires_grad=True)
    base = torch.nn.Linear(in_features, out_features, device=device, dtype=dtype).requires_grad_(False)
    lora_a = torch.nn.Parameter(torch.randn(rank, in_features, device=device, dtype=dtype) / in_features**0.5)
    lora_b = torch.nn.Parameter(torch.randn(out_features, rank, device=device, dtype=dtype) / rank**0.5)
    quantized = quantize_weight_int8(base.weight) if weight_kind == "int8" else None
    flops_fwd = 2 * tokens * in_features * out_features + 2 * tokens * rank * (in_features + out_features)
    flops_bwd = 2 * tokens * in_features * out_features + 4 * tokens * rank * (in_features + out_features)
    not_activations = [x, base.weight, base.bias, lora_a, lora_b, *(quantized or ())]

    def activation_memory(impl, pass_, forward):
        return {"saved_MiB": saved_bytes(forward, not_activations) / 2**20} if pass_ == "fwd+bwd" else {}

    return Workload(
        case={"tokens": tokens, "in": in_features, "out": out_features, "rank": rank, "dropout": dropout_p,
              "weight": weight_kind},
        implementations=implementations(device, x, base, lora_a, lora_b, dropout_p, quantized),
        leaves=(x, lora_a, lora_b),
        backward=lambda y: y.sum().backward(),
        flops={"fwd": flops_fwd, "fwd+bwd": flops_fwd + flops_bwd},
        measured_within={FUSED_GEMM_IMPL: _fused_triton_base_gemm, WMMA_INT8_IMPL: _wmma_int8_base_gemm},
        extra=activation_memory,
    )


def summary(rows: list[dict], device: torch.device) -> list[str]:
    """One line per case: fastft's best GPU backend vs PEFT and the floor (fwd+bwd)."""
    lines = []
    cases = dict.fromkeys((r["tokens"], r["in"], r["out"], r["rank"], r["dropout"], r["weight"]) for r in rows)
    for case in cases:
        def row_of(impl):
            for r in rows:
                if (r["tokens"], r["in"], r["out"], r["rank"], r["dropout"], r["weight"]) == case and \
                        r["impl"] == impl and r["pass"] == "fwd+bwd" and r.get("ms"):
                    return r
            return None

        ours = row_of("fastft")
        ref = row_of("peft") or row_of("dequant+peft")
        floor = row_of("linear (floor)")
        if ours and ref and floor:
            tokens, k, o, rank, p, kind = case
            lines.append(f"{tokens} tok {k}->{o} r{rank} p{p} {kind}: fastft {ours['ms']:.3g} ms, "
                         f"{ref['ms'] / ours['ms']:.2f}x vs {ref['impl']}, {ours['ms'] / floor['ms']:.2f}x the floor; "
                         f"activations saved {ours.get('saved_MiB', 0):.3g} vs {ref.get('saved_MiB', 0):.3g} MiB")
    return lines


def plot(rows: list[dict], path) -> None:
    import matplotlib.pyplot as plt

    data = [r for r in rows if r["pass"] == "fwd+bwd" and r.get("ms")]
    cases = len({(r["tokens"], r["in"], r["out"], r["rank"], r["dropout"], r["weight"]) for r in data})
    impls = len({r["impl"] for r in data})
    fig, ax = plt.subplots(figsize=(max(8, 0.9 * cases * max(1, impls) / 3), 4.5))
    bar_chart(ax, data, lambda r: (r["tokens"], r["in"], r["out"], r["rank"], r["dropout"], r["weight"]),
              lambda c: "{}tok\n{}->{}\nr{} p{}\n{}".format(*c))
    ax.set_ylabel("median ms, forward+backward (log)")
    ax.set_title("LoRA linear")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


SUITE = OpSuite(name="lora_linear", columns=COLUMNS, configs=configs, workload=workload,
                speedups={"speedup_vs_peft": ("peft", "dequant+peft")}, overheads={"overhead_vs_floor": ("linear (floor)",)},
                summary=summary, summary_title="forward+backward, fastft (auto):", plot=plot)


def run(quick: bool = False, out_dir=None) -> list[dict]:
    return run_op_suite(SUITE, quick, out_dir)


def main(argv=None) -> None:
    suite_main(run, __doc__, argv)


if __name__ == "__main__":
    main()
