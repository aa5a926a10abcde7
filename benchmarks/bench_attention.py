"""Benchmark: fastft.ops.attention vs PyTorch's scaled_dot_product_attention.

Side by side in one process, per (batch, heads_q, heads_kv, seq, head_dim, causal, pass):
  sdpa            torch.nn.functional.scaled_dot_product_attention (PyTorch picks its
                  flash / memory-efficient / math kernel), the reference people use
  naive           attention_ref(upcast=False): every score materialised, input dtype
                  (CPU only: it is what SDPA's math path does, and it runs out of memory
                  on long GPU sequences)
  fastft          fastft.ops.attention, backend="auto"
  fastft[<b>]     each backend that can run these inputs (cuda, triton, torch)

Shapes: BERT-base (12 heads, head_dim 64, bidirectional) and Llama-like (32 heads,
head_dim 128, causal, and 8 kv heads for grouped-query attention) at seq 512-8192 with
batch * seq = 16k tokens (FlashAttention-2's benchmark convention), plus the other
causal / bidirectional combinations. The CPU sweep uses small shapes.

TFLOP/s count the useful matmul FLOPs: forward 4·B·Hq·Sq·Sk·D (QKᵀ and PV), halved when
causal; forward+backward 3.5x that (the backward does 2.5x the forward's matmuls). On a GPU
they are also given as a fraction of the measured bf16 matmul peak.

    python -m benchmarks.bench_attention [--quick] [--out DIR]
"""

from __future__ import annotations

import itertools

import torch
import torch.nn.functional as F

from benchmarks.common import OpSuite, Workload, available_backends, run_op_suite, suite_main
from fastft.ops.attention import attention, attention_ref, backend_reasons

COLUMNS = ["model", "batch", "heads_q", "heads_kv", "seq", "head_dim", "causal", "dtype", "pass", "impl", "ms",
           "speedup_vs_sdpa", "tflops", "frac_matmul_peak", "peak_extra_MiB", "status"]
GPU_TOKENS = 16384  # batch * seq per GPU configuration

# name -> (heads_q, heads_kv, head_dim, causal)
MODELS = {
    "bert-base": (12, 12, 64, False),
    "bert-base-causal": (12, 12, 64, True),
    "llama": (32, 32, 128, True),
    "llama-bidir": (32, 32, 128, False),
    "llama-gqa": (32, 8, 128, True),
}


def configs(device: torch.device, quick: bool):
    """(model, batch, seq) to run."""
    if device.type == "cuda":
        if quick:
            cases = [("bert-base", 512), ("bert-base", 4096), ("llama", 2048), ("llama", 8192), ("llama-gqa", 8192)]
        else:
            cases = list(itertools.product(MODELS, (512, 1024, 2048, 4096, 8192)))
        return [(model, max(1, GPU_TOKENS // seq), seq) for model, seq in cases]
    if quick:
        return [("bert-base", 2, 128), ("llama-gqa", 1, 256)]
    return [("bert-base", 4, 512), ("llama", 1, 512), ("llama-gqa", 1, 1024), ("bert-base", 1, 2048)]


def implementations(device: torch.device, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool) -> dict:
    group = q.shape[1] // k.shape[1]

    def sdpa():
        if group > 1:  # SDPA's enable_gqa (torch >= 2.5) where available, else repeated heads
            try:
                return F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=True)
            except TypeError:
                return F.scaled_dot_product_attention(q, k.repeat_interleave(group, 1), v.repeat_interleave(group, 1),
                                                      is_causal=causal)
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal)

    impls = {"sdpa": sdpa, "fastft": lambda: attention(q, k, v, causal=causal)}
    if device.type == "cuda":
        for backend in available_backends(backend_reasons(q, k, v), ("cuda", "triton", "torch")):
            impls[f"fastft[{backend}]"] = lambda b=backend: attention(q, k, v, causal=causal, backend=b)
    if device.type == "cpu":
        impls["naive"] = lambda: attention_ref(q, k, v, causal=causal, upcast=False)
    return impls


def useful_flops(batch, heads_q, seq, head_dim, causal, pass_) -> float:
    forward = 4.0 * batch * heads_q * seq * seq * head_dim * (0.5 if causal else 1.0)
    return forward * (3.5 if pass_ == "fwd+bwd" else 1.0)


def workload(config, device, dtype) -> Workload:
    model, batch, seq = config
    heads_q, heads_kv, head_dim, causal = MODELS[model]
    torch.manual_seed(0)
    q = torch.randn(batch, heads_q, seq, head_dim, device=device, dtype=dtype, requires_grad=True)
    k = torch.randn(batch, heads_kv, seq, head_dim, device=device, dtype=dtype, requires_grad=True)
    v = torch.randn(batch, heads_kv, seq, head_dim, device=device, dtype=dtype, requires_grad=True)
    grad_out = torch.randn_like(q)
    return Workload(
        case=dict(model=model, batch=batch, heads_q=heads_q, heads_kv=heads_kv, seq=seq, head_dim=head_dim,
                  causal=causal),
        implementations=implementations(device, q, k, v, causal),
        leaves=(q, k, v),
        backward=lambda out: out.backward(grad_out),
        flops={pass_: useful_flops(batch, heads_q, seq, head_dim, causal, pass_) for pass_ in ("fwd", "fwd+bwd")},
        gradient_bytes=sum(t.numel() * t.element_size() for t in (q, k, v)),
    )


def summary(rows: list[dict], device: torch.device) -> list[str]:
    """fastft (auto) vs SDPA at the largest sequence of each model, forward+backward."""
    lines = []
    for model in dict.fromkeys(r["model"] for r in rows):
        ours = [r for r in rows if r["model"] == model and r["impl"] == "fastft" and r["pass"] == "fwd+bwd"
                and r.get("speedup_vs_sdpa")]
        if ours:
            top = max(ours, key=lambda r: r["seq"])
            lines.append(f"{model} seq {top['seq']} fwd+bwd: fastft {top['ms']:.3g} ms, "
                         f"{top['speedup_vs_sdpa']:.2f}x SDPA, {top['tflops']:.3g} TFLOP/s")
    return lines


def plot(rows: list[dict], path) -> None:
    import matplotlib.pyplot as plt

    models = list(dict.fromkeys(r["model"] for r in rows))
    fig, axes = plt.subplots(len(models), 2, figsize=(10, 3.2 * len(models)), squeeze=False)
    for m, model in enumerate(models):
        for p, pass_ in enumerate(("fwd", "fwd+bwd")):
            ax = axes[m][p]
            for impl in dict.fromkeys(r["impl"] for r in rows):
                points = sorted((r["seq"], r["tflops"]) for r in rows if r["model"] == model and r["impl"] == impl
                                and r["pass"] == pass_ and r.get("tflops"))
                if points:
                    ax.plot(*zip(*points), marker="o", label=impl)
            ax.set_xscale("log", base=2)
            ax.set_xlabel("sequence length")
            ax.set_ylabel("TFLOP/s")
            ax.set_title(f"{model}, {pass_}", fontsize=9)
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


SUITE = OpSuite(name="attention", columns=COLUMNS, configs=configs, workload=workload,
                speedups={"speedup_vs_sdpa": ("sdpa",)}, summary=summary, summary_title="fastft (auto) vs SDPA:",
                plot=plot)


def run(quick: bool = False, out_dir=None) -> list[dict]:
    return run_op_suite(SUITE, quick, out_dir)


def main(argv=None) -> None:
    suite_main(run, __doc__, argv)


if __name__ == "__main__":
    main()
