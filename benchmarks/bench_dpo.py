"""Benchmark: one DPO step (forward of chosen + rejected, loss, backward) on a Llama-style
model with random weights, fastft against the implementations people would use.

Side by side in one process, same model, same batch (the B chosen sequences then the B
rejected ones, right-padded, response tokens labelled), reference log-probs cached:

  fastft                       ``fastft.alignment.PreferenceObjective(DPO(beta=0.1))``:
                               sequence log-probs from the backbone's hidden states through
                               ``linear_cross_entropy(reduction="none")``, no logits
  transformers (full logits)   ``model(...).logits`` -> log_softmax -> gather -> the same DPO
                               loss: the (2B, T, vocab) logits and their log-softmax in fp32
  trl DPOTrainer               ``trl.DPOTrainer.compute_loss`` (precomputed reference
                               log-probs), when ``trl`` is installed

Attention is the model's default (sdpa) in every row, so the rows differ only in how the
log-probs are computed. Reported: median ms, peak extra memory (beyond the inputs, the weights
and their gradient buffers, which stay allocated between steps as in training), speed-up and
memory ratio against the full-logits step, tokens/s (all tokens of the batch, padding excluded). Targets (the
issue's): peak memory <= 0.5x the full-logits step at vocab >= 32k; time <= 1.0x on a CPU;
>= 1.3x tokens/s on a GPU (TinyLlama-1.1B shapes at sequence 1024, bf16).

    python -m benchmarks.bench_dpo [--quick] [--out DIR]
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

import statistics
import time

from benchmarks.common import (
    OpSuite,
    Workload,
    add_ratios,
    bar_chart,
    environment,
    matmul_peak_tflops,
    measure_workload,
    report,
    suite_main,
    synchronize,
)
from fastft.alignment import DPO, CachedReference, PreferenceObjective

COLUMNS = ["model", "vocab", "pairs", "seq", "dtype", "pass", "impl", "ms", "speedup_vs_full_logits", "ms_interleaved",
           "time_vs_full_logits_interleaved", "peak_extra_MiB", "memory_vs_full_logits", "tokens_per_s", "status"]
ROUNDS = 7  # interleaved fwd+bwd rounds (each runs every implementation once, in a rotating order)
BETA = 0.1
REFERENCE = "transformers (full logits)"

# (name, hidden, layers, heads, kv heads, intermediate, vocab, pairs, prompt tokens, response tokens)
CPU_CONFIGS = [
    ("llama-h256-l2", 256, 2, 4, 4, 688, 32000, 4, 64, 64),
    ("llama-h256-l2", 256, 2, 4, 4, 688, 32000, 4, 128, 128),
    ("llama-h256-l2", 256, 2, 4, 4, 688, 128256, 4, 64, 64),
]
GPU_CONFIGS = [
    ("tinyllama-1.1b", 2048, 22, 32, 4, 5632, 32000, 4, 512, 512),
    ("tinyllama-1.1b", 2048, 22, 32, 4, 5632, 128256, 4, 512, 512),
]


def configs(device: torch.device, quick: bool):
    found = GPU_CONFIGS if device.type == "cuda" else CPU_CONFIGS
    return found[:1] if quick else found


def build_model(config, device, dtype):
    import transformers

    name, hidden, layers, heads, kv_heads, intermediate, vocab, *_ = config
    torch.manual_seed(0)
    hf_config = transformers.LlamaConfig(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers,
                                         num_attention_heads=heads, num_key_value_heads=kv_heads,
                                         intermediate_size=intermediate, max_position_embeddings=4096, pad_token_id=0,
                                         tie_word_embeddings=False)
    model = transformers.LlamaForCausalLM(hf_config).to(device=device, dtype=dtype)
    model.config.use_cache = False
    return model.train()


def make_batch(config, device) -> dict:
    """B chosen then B rejected sequences: prompt + response of varying lengths (up to the
    configured ones), right-padded; labels on response tokens."""
    *_, vocab, pairs, prompt_len, response_len = config
    generator = torch.Generator().manual_seed(1)
    rows = []
    for _ in range(2 * pairs):
        p = int(torch.randint(prompt_len // 2, prompt_len + 1, (1,), generator=generator))
        r = int(torch.randint(response_len // 2, response_len + 1, (1,), generator=generator))
        rows.append((torch.randint(1, vocab, (p,), generator=generator), torch.randint(1, vocab, (r,), generator=generator)))
    length = max(len(p) + len(r) for p, r in rows)
    input_ids = torch.zeros(2 * pairs, length, dtype=torch.long)
    labels = torch.full_like(input_ids, -100)
    attention_mask = torch.zeros_like(input_ids)
    for i, (p, r) in enumerate(rows):
        n = len(p) + len(r)
        input_ids[i, :n] = torch.cat([p, r])
        labels[i, len(p):n] = r
        attention_mask[i, :n] = 1
    batch = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels,
             "ref_logps": -10.0 * (labels != -100).sum(-1).float() + torch.randn(2 * pairs, generator=generator)}
    return {k: v.to(device) for k, v in batch.items()}


def full_logits_dpo_loss(model, batch):
    """The step written the usual way, from the full logits."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]  # (2B, T-1, V)
    targets = batch["labels"][:, 1:]
    logps = F.log_softmax(logits.float(), dim=-1).gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    logps = (logps * (targets != -100)).sum(-1)
    pairs = logps.shape[0] // 2
    ref = batch["ref_logps"]
    z = BETA * ((logps[:pairs] - ref[:pairs]) - (logps[pairs:] - ref[pairs:]))
    return -F.logsigmoid(z).mean()


def trl_step(model, batch):
    """``trl.DPOTrainer.compute_loss`` on the same batch, or None when trl is missing."""
    try:
        import datasets
        from trl import DPOConfig, DPOTrainer
    except ImportError:
        return None
    from fastft.data import toy_tokenizer

    tokenizer = toy_tokenizer(kind="gpt")  # only tokenises TRL's dummy dataset; the batch is given as ids
    args = DPOConfig(output_dir="/tmp/fastft-bench-dpo-trl", precompute_ref_log_probs=True, report_to=[], beta=BETA,
                     use_cpu=batch["input_ids"].device.type == "cpu", bf16=False)
    dummy = datasets.Dataset.from_list([{"prompt": "a dog", "chosen": "one cat .", "rejected": "one river ."}] * 2)
    trainer = DPOTrainer(model=model, args=args, train_dataset=dummy, processing_class=tokenizer)
    pairs = batch["input_ids"].shape[0] // 2
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"],
              "completion_mask": (batch["labels"] != -100).long(),
              "ref_chosen_logps": batch["ref_logps"][:pairs], "ref_rejected_logps": batch["ref_logps"][pairs:]}
    return lambda: trainer.compute_loss(model, inputs)


def workload(config, device, dtype) -> Workload:
    model = build_model(config, device, dtype)
    batch = make_batch(config, device)
    objective = PreferenceObjective(DPO(beta=BETA), CachedReference())
    counts = objective.counts(batch)

    def fastft_step():
        sums, _ = objective.loss(model, batch, counts)
        return sums["pref"] / counts["pref"]

    implementations = {"fastft": fastft_step, REFERENCE: lambda: full_logits_dpo_loss(model, batch)}
    trl = trl_step(model, batch)
    if trl is not None:
        implementations["trl DPOTrainer"] = trl
    tokens = int(batch["attention_mask"].sum())
    name, *_, vocab, pairs, _, _ = config
    # The parameter gradients stay allocated between steps (accumulated into, as a training
    # loop's buffers are): clearing them inside the timed step would free memory that the
    # CPU's resident-set measurement counted before the step, hiding that much of its peak.
    return Workload(
        case=dict(model=name, vocab=vocab, pairs=pairs, seq=batch["input_ids"].shape[1]),
        implementations=implementations,
        leaves=(),
        extra=lambda impl, pass_, forward: {"tokens": tokens},
    )


def add_columns(rows: list[dict]) -> None:
    """tokens/s, and fastft's memory against the full-logits step of the same case and pass."""
    for row in rows:
        if row.get("ms"):
            row["tokens_per_s"] = row["tokens"] / (row["ms"] * 1e-3)
    for row in rows:
        reference = next((r for r in rows if r["impl"] == REFERENCE and r["pass"] == row["pass"]
                          and (r["model"], r["vocab"], r["seq"]) == (row["model"], row["vocab"], row["seq"])), None)
        if reference and reference.get("peak_extra_MiB") and row.get("peak_extra_MiB") is not None:
            row["memory_vs_full_logits"] = row["peak_extra_MiB"] / reference["peak_extra_MiB"]


def summary(rows: list[dict], device: torch.device) -> list[str]:
    add_columns(rows)
    lines = []
    for row in rows:
        if row["impl"] != "fastft" or row["pass"] != "fwd+bwd" or not row.get("ms"):
            continue
        case = f"{row['model']} V={row['vocab']} {row['pairs']} pairs seq {row['seq']}"
        if device.type == "cpu":
            lines.append(f"CPU {case}: time {row['time_vs_full_logits_interleaved']:.2f}x the full-logits step "
                         f"(interleaved medians; back-to-back {1 / row['speedup_vs_full_logits']:.2f}x; target <= 1.0), "
                         f"peak extra memory {row['memory_vs_full_logits']:.2f}x (target <= 0.5)")
        else:
            lines.append(f"GPU {case}: {1 / row['time_vs_full_logits_interleaved']:.2f}x the full-logits step's tokens/s "
                         f"(target >= 1.3), peak memory {row['memory_vs_full_logits']:.2f}x")
        for other in rows:
            if other["impl"] == "trl DPOTrainer" and other["pass"] == "fwd+bwd" and other.get("ms") and (
                    other["model"], other["vocab"], other["seq"]) == (row["model"], row["vocab"], row["seq"]):
                lines.append(f"  vs trl DPOTrainer: {other['ms_interleaved'] / row['ms_interleaved']:.2f}x faster "
                             "(interleaved medians), peak extra memory "
                             f"{row['peak_extra_MiB']:.0f} vs {other['peak_extra_MiB']:.0f} MiB")
    if device.type == "cpu":
        lines.append("GPU rows (TinyLlama-1.1B shapes, sequence 1024, bf16): not measured, no CUDA device on this machine")
    return lines


def plot(rows: list[dict], path) -> None:
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5))
    step_rows = [r for r in rows if r["pass"] == "fwd+bwd"]
    for ax, value, label in ((axes[0], "ms", "median ms (log)"), (axes[1], "peak_extra_MiB", "peak extra MiB (log)")):
        bar_chart(ax, step_rows, lambda r: (r["vocab"], r["seq"]), lambda c: "V={}\nseq {}".format(*c), value=value)
        ax.set_ylabel(label)
        ax.set_title(f"DPO step (fwd+bwd): {label.split(' (')[0]}")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


SUITE = OpSuite(name="dpo", columns=COLUMNS, configs=configs, workload=workload,
                speedups={"speedup_vs_full_logits": (REFERENCE,)}, summary=summary, summary_title="Targets:", plot=plot)


def interleaved_ms(workload: Workload, device: torch.device, rounds: int = ROUNDS) -> dict[str, float]:
    """Median fwd+bwd ms of each implementation over ``rounds`` rounds that run every
    implementation once, in a rotating order: on a machine shared with other jobs, a load
    that changes over minutes then weighs on every implementation alike (the harness's
    back-to-back repeats give each its own stretch of time)."""
    names = list(workload.implementations)
    times = {name: [] for name in names}
    for r in range(rounds):
        for name in names[r % len(names):] + names[: r % len(names)]:
            synchronize(device)
            start = time.perf_counter()
            workload.implementations[name]().backward()
            synchronize(device)
            times[name].append((time.perf_counter() - start) * 1e3)
    return {name: statistics.median(t) for name, t in times.items()}


def run(quick: bool = False, out_dir=None) -> list[dict]:
    """``run_op_suite``'s sweep (bf16 on a GPU, fp32 on a CPU), plus the interleaved timing."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    env = environment(device)
    print(f"dpo on {env['device']} ({dtype})", flush=True)
    matmul_peak = matmul_peak_tflops(device, dtype) if device.type == "cuda" else None
    rows = []
    for config in configs(device, quick):
        work = workload(config, device, dtype)
        case_rows = measure_workload(work, device, dtype, matmul_peak)
        add_ratios(case_rows, SUITE.speedups, {})
        medians = interleaved_ms(work, device)
        for row in case_rows:
            if row["pass"] == "fwd+bwd" and row["impl"] in medians:
                row["ms_interleaved"] = medians[row["impl"]]
                row["time_vs_full_logits_interleaved"] = medians[row["impl"]] / medians[REFERENCE]
        print("interleaved fwd+bwd median ms:", {k: round(v, 1) for k, v in medians.items()}, flush=True)
        rows += case_rows
    lines = summary(rows, device)
    report(SUITE.name, rows, env, COLUMNS, out_dir, plot, title="Targets:", lines=lines)
    return rows


def main(argv=None) -> None:
    suite_main(run, __doc__, argv)


if __name__ == "__main__":
    main()
