"""``fastft demo``: the two stages of a language model's life, side by side, in minutes.

    fastft demo                                   # built-in language, no downloads
    fastft demo --model PATH --data a.txt b.txt --labels labels.csv   # your model and data

1. **Pretrain** a small BERT with masked-LM on unlabeled text (``fastft.pretrain``).
2. **Fine-tune** it on a small labelled set four ways (``fastft.finetune``): full
   fine-tuning, frozen features (only the new head trains), LoRA, and gradual unfreezing.
3. **From scratch**: the same architecture, randomly initialised, trained on the same
   labels with the same recipe as full fine-tuning.
4. Print a table (held-out accuracy, trainable parameters, time, masked-LM perplexity on
   held-out unlabeled text before / after fine-tuning) and write into ``--out``:
   ``results.md`` (the table), ``metrics.json`` (everything), ``curves.png``
   (pretraining loss; held-out accuracy per epoch of every fine-tuning run), and the
   runs' own logs under ``runs/``.

The built-in language (``fastft.data.demo_language``) makes pretraining matter: the label is the
latent word class of a sentence (next to a distractor sentence of another class), which
only co-occurrence in unlabeled text reveals, and the test set is written only with words
the labelled training set never contains.

Your own data (any of ``--model`` / ``--data`` / ``--labels`` switches to it; ``--labels``
is then required):

    --labels FILE   .csv with a header holding ``text`` and ``label`` columns, or .jsonl
                    with one ``{"text": ..., "label": ...}`` object per line (an optional
                    ``text_pair`` column makes it a sentence-pair task). Shuffled
                    (``--seed``) and split: 20% test, 10% validation (selects the best
                    epoch), the rest trains.
    --data FILES    unlabeled text for (continued) pretraining: .txt with one document per
                    non-empty line, or .jsonl / .csv with a ``text`` field. 10% of the
                    documents are held out for perplexity. Default: the texts of the
                    labelled training + validation rows.
    --model PATH    a masked-LM (BERT / RoBERTa / ... family) directory or Hub name with its
                    tokenizer: pretraining *continues* from it, and from-scratch uses its
                    architecture with random weights. Default: the demo's small BERT and a
                    WordPiece tokenizer trained on your texts.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import os
import random
import resource
import shutil
import time
import warnings
from dataclasses import dataclass, field
from typing import Sequence

import torch

from fastft.data.demo_language import SPECIAL_TOKENS, DemoLanguage
from fastft.errors import loading
from fastft.models.loading import load_pretrained
from fastft.finetuning.strategies import LoRA
from fastft.train.runtime import resolve_device

__all__ = ["DemoConfig", "DemoResult", "build_word_tokenizer", "main", "run_demo"]

STRATEGIES = ("full", "features", "lora", "gradual-unfreeze")
SCRATCH = "scratch"


@dataclass
class DemoConfig:
    """Sizes and recipes of the demo. The defaults finish in about 3 minutes on 2 CPU cores
    (measured, see the README); tests shrink the step counts and keep the code path."""

    # built-in language (fastft.data.demo_language.DemoLanguage) and set sizes
    language: DemoLanguage = field(default_factory=DemoLanguage)
    num_unlabeled: int = 4000  # pretraining documents
    num_heldout_unlabeled: int = 200  # for masked-LM perplexity
    num_train: int = 64  # labelled training documents (seen words only)
    num_validation: int = 64  # selects the best epoch (seen words only)
    num_test: int = 400  # held-out accuracy (unseen words only)
    # the small BERT (also the from-scratch architecture)
    hidden_size: int = 64
    num_layers: int = 2
    num_heads: int = 4
    intermediate_size: int = 128
    max_length: int = 64
    # pretraining
    pretrain_steps: int = 600
    pretrain_batch_size: int = 32
    pretrain_lr: float = 3e-3
    # fine-tuning: the same epochs / batch for every run, a learning rate per strategy
    epochs: int = 20
    batch_size: int = 8
    lr: dict = field(default_factory=lambda: {
        "full": 3e-4, "features": 3e-3, "lora": 2e-3, "gradual-unfreeze": 5e-4, SCRATCH: 3e-4,
    })
    lora: LoRA = field(default_factory=lambda: LoRA(rank=4, alpha=8, target_modules="all-linear"))
    strategies: tuple[str, ...] = STRATEGIES


@dataclass
class DemoResult:
    """What ``run_demo`` returns (and writes to ``metrics.json``)."""

    rows: list[dict]  # one per run: strategy, test/validation accuracy, params, time, perplexities
    pretraining: dict  # steps, time, loss curve, held-out perplexity
    curves: dict  # strategy -> [(epoch, held-out accuracy)]
    chance: float  # 1 / number of classes
    table: str
    files: dict  # name -> path


# ----------------------------------------------------------------------------- data


def build_word_tokenizer(vocabulary: Sequence[str], max_length: int = 512):
    """A BERT-style ``PreTrainedTokenizerFast`` with one id per whitespace-separated word of
    ``vocabulary`` (which must start with ``[PAD] [UNK] [CLS] [SEP] [MASK]``): the demo
    language needs no sub-words, and word ids carry no hint of a word's class."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    if list(vocabulary[: len(SPECIAL_TOKENS)]) != SPECIAL_TOKENS:
        raise ValueError(f"vocabulary must start with {SPECIAL_TOKENS}, got {list(vocabulary[:5])}")
    tokenizer = Tokenizer(models.WordLevel({word: i for i, word in enumerate(vocabulary)}, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", vocabulary.index("[CLS]")), ("[SEP]", vocabulary.index("[SEP]"))],
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]", sep_token="[SEP]",
        mask_token="[MASK]", model_max_length=max_length,
    )


def read_labels(path: str) -> list[dict]:
    """Rows ``{"text", "label"}`` from a .csv (header with ``text`` and ``label``) or a
    .jsonl file. Raises ValueError naming the file for a missing column or no rows."""
    with open(path, newline="", encoding="utf-8") as f:
        if path.endswith(".csv"):
            rows = list(csv.DictReader(f))
        else:
            rows = [json.loads(line) for line in f if line.strip()]
    if not rows:
        raise ValueError(f"--labels {path}: no rows")
    for i, row in enumerate(rows):
        missing = [k for k in ("text", "label") if k not in row]
        if missing:
            raise ValueError(f"--labels {path}: row {i} lacks {missing} (has {sorted(row)}); need text and label")
    pairs = all(row.get("text_pair") is not None for row in rows)
    return [{"text": str(row["text"]), "label": row["label"], **({"text_pair": str(row["text_pair"])} if pairs else {})}
            for row in rows]


def read_texts(paths: Sequence[str]) -> list[str]:
    """Documents from .txt (one per non-empty line) or .jsonl / .csv (a ``text`` field)."""
    texts = []
    for path in paths:
        with open(path, newline="", encoding="utf-8") as f:
            if path.endswith(".csv"):
                texts += [row["text"] for row in csv.DictReader(f)]
            elif path.endswith(".jsonl"):
                texts += [json.loads(line)["text"] for line in f if line.strip()]
            else:
                texts += [line.strip() for line in f if line.strip()]
    if not texts:
        raise ValueError(f"--data {list(paths)}: no documents")
    return texts


def split_rows(rows: list, seed: int, fractions: Sequence[float]) -> list[list]:
    """Shuffle ``rows`` (seeded) and cut off parts of the given ``fractions`` (each at least
    one row); the remainder comes first in the returned list."""
    rows = list(rows)
    random.Random(seed).shuffle(rows)
    sizes = [max(1, round(len(rows) * f)) for f in fractions]
    if sum(sizes) >= len(rows):
        raise ValueError(f"{len(rows)} rows are too few to split off {list(fractions)} and keep some to train on")
    parts, end = [], len(rows)
    for size in sizes:
        parts.append(rows[end - size : end])
        end -= size
    return [rows[:end], *parts]


# ----------------------------------------------------------------------------- runs


def _small_bert_config(config: DemoConfig, vocab_size: int):
    from transformers import BertConfig

    return BertConfig(
        vocab_size=vocab_size, hidden_size=config.hidden_size, num_hidden_layers=config.num_layers,
        num_attention_heads=config.num_heads, intermediate_size=config.intermediate_size,
        max_position_embeddings=max(config.max_length, 64), type_vocab_size=2,
        # No dropout: the generator supplies plenty of fresh text, so a short run gains
        # nothing from it and learns the word classes faster without.
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
    )


def _timed(fn, *args, **kwargs):
    """``fn(...)``, wall seconds, CPU seconds of this process (all threads)."""
    wall, cpu = time.perf_counter(), time.process_time()
    out = fn(*args, **kwargs)
    return out, time.perf_counter() - wall, time.process_time() - cpu


def _train_curve(metrics_path: str) -> tuple[list[int], list[float], list[int], list[float]]:
    """(train steps, train losses, eval steps, eval losses) from a loop's metrics.jsonl."""
    steps, losses, eval_steps, eval_losses = [], [], [], []
    with open(metrics_path) as f:
        for line in f:
            record = json.loads(line)
            if "eval_loss" in record:
                eval_steps.append(record["step"])
                eval_losses.append(record["eval_loss"])
            elif "loss" in record:
                steps.append(record["step"])
                losses.append(record["loss"])
    return steps, losses, eval_steps, eval_losses


def _curve(history: list[dict]) -> list[tuple[int, float]]:
    return [(h["epoch"], h["accuracy"]) for h in history if h.get("set") == "test" and "accuracy" in h]


@dataclass
class DemoData:
    """The demo's texts, labelled rows and tokenizer (built-in language or the user's)."""

    unlabeled: list[str]
    heldout_text: list[str]
    train_rows: list[dict]
    validation_rows: list[dict]
    test_rows: list[dict]
    tokenizer: object
    source: str

    @property
    def classes(self) -> list:
        rows = self.train_rows + self.validation_rows + self.test_rows
        return sorted({r["label"] for r in rows}, key=lambda v: (isinstance(v, str), v))


def run_demo(
    config: DemoConfig | None = None,
    out_dir: str = "demo_out",
    *,
    device: str = "auto",
    seed: int = 0,
    model: str | None = None,
    data: Sequence[str] | None = None,
    labels: str | None = None,
    progress: bool = False,
    log=print,
) -> DemoResult:
    """Run the whole comparison and write ``results.md``, ``metrics.json``, ``curves.png``
    into ``out_dir``. ``model`` / ``data`` / ``labels``: see the module docstring (None:
    the built-in language). Returns a ``DemoResult``."""
    config = config or DemoConfig()
    unknown = sorted(set(config.strategies) - set(STRATEGIES))
    if unknown:
        raise ValueError(f"strategies {unknown} are not part of the demo; choose from {STRATEGIES}")
    if any(x is not None for x in (model, data)) and labels is None:
        raise ValueError("--model / --data need --labels (a .csv or .jsonl with text,label) to fine-tune on")
    out_dir = os.path.abspath(out_dir)
    runs_dir = os.path.join(out_dir, "runs")
    shutil.rmtree(runs_dir, ignore_errors=True)  # the loop appends to metrics.jsonl: start clean
    os.makedirs(runs_dir, exist_ok=True)
    _quiet(progress)

    demo = _load_data(config, seed, model, data, labels)
    chance = 1.0 / len(demo.classes)
    log(f"fastft demo: {demo.source}")
    log(f"  {len(demo.unlabeled)} unlabeled documents ({len(demo.heldout_text)} held out), labelled: "
        f"{len(demo.train_rows)} train / {len(demo.validation_rows)} validation / {len(demo.test_rows)} test, "
        f"{len(demo.classes)} classes (chance {chance:.2f})")
    # fastft.patch routes attention / loss through the fused kernels; on a CPU every op takes
    # its plain-torch path anyway (and attention dropout there draws its mask slowly), so
    # the patch only runs where it can pay off.
    common = dict(seed=seed, device=device, progress=progress, plot=False, log_every=10,
                  fused=resolve_device(device).type == "cuda")

    # 1. pretraining, 2. fine-tuning four ways, 3. from scratch
    pretraining, perplexity = _pretrain_stage(config, demo, model, os.path.join(runs_dir, "pretrain"), common, log)
    rows, curves = [], {}
    for name in [*config.strategies, SCRATCH]:
        row, curves[name] = _finetune_run(config, demo, name, pretraining, perplexity, os.path.join(runs_dir, name),
                                          common)
        rows.append(row)
        log(f"  {name:<17} held-out accuracy {row['test_accuracy']:.3f}  ({row['wall_s']:.1f}s, cpu {row['cpu_s']:.1f}s)")

    # 4. the report
    table = format_table(rows, pretraining, chance, len(demo.test_rows))
    files = {
        "table": os.path.join(out_dir, "results.md"),
        "metrics": os.path.join(out_dir, "metrics.json"),
        "plot": os.path.join(out_dir, "curves.png"),
    }
    with open(files["table"], "w") as f:
        f.write(table + "\n")
    plot_demo(pretraining["loss_curve"], curves, chance, files["plot"])
    result = DemoResult(rows=rows, pretraining=pretraining, curves=curves, chance=chance, table=table, files=files)
    with open(files["metrics"], "w") as f:
        json.dump({**dataclasses.asdict(result), "config": _config_dict(config), "seed": seed, "source": demo.source,
                   "max_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}, f, indent=2, default=str)
    return result


def _quiet(progress: bool) -> None:
    import transformers

    transformers.logging.set_verbosity_error()  # "newly initialized weights" is the point here
    if not progress:
        import datasets

        datasets.disable_progress_bars()
        transformers.utils.logging.disable_progress_bar()
    warnings.filterwarnings("ignore", message=".*fastft.patch unavailable.*")


def _load_data(config: DemoConfig, seed: int, model: str | None, data, labels: str | None) -> DemoData:
    """The built-in language's documents and labelled sets, or the user's files split
    70/10/20 (and a tokenizer: the model's, else one trained on the texts)."""
    if labels is None:
        language = dataclasses.replace(config.language, seed=seed)
        return DemoData(
            unlabeled=language.unlabeled(config.num_unlabeled, seed_offset=0),
            heldout_text=language.unlabeled(config.num_heldout_unlabeled, seed_offset=500),
            train_rows=language.labelled(config.num_train, "train"),
            validation_rows=language.labelled(config.num_validation, "validation"),
            test_rows=language.labelled(config.num_test, "test"),
            tokenizer=build_word_tokenizer(language.vocabulary, config.max_length),
            source="built-in language (fastft.data.demo_language)",
        )
    train_rows, test_rows, validation_rows = split_rows(read_labels(labels), seed, (0.2, 0.1))
    texts = read_texts(data) if data else [r["text"] for r in train_rows + validation_rows]
    unlabeled, heldout_text = split_rows(texts, seed + 1, (0.1,))
    if model is not None:
        import transformers

        with loading("model", model):
            tokenizer = transformers.AutoTokenizer.from_pretrained(model)
    else:
        from fastft.data.toy import toy_tokenizer

        tokenizer = toy_tokenizer(unlabeled, kind="bert", vocab_size=4000)
    source = f"labels {labels}, unlabeled {list(data) if data else '(labelled texts)'}, model {model or 'small BERT'}"
    return DemoData(unlabeled, heldout_text, train_rows, validation_rows, test_rows, tokenizer, source)


def _pretrain_stage(config: DemoConfig, demo: DemoData, model: str | None, run_dir: str, common: dict, log):
    """Masked-LM pretraining (from scratch, or continued from ``model``), exported for the
    fine-tuning runs. Returns (a summary, ``perplexity(lm_model)`` on the held-out text)."""
    import transformers

    import fastft

    torch.manual_seed(common["seed"])
    if model is None:
        mlm_model = transformers.BertForMaskedLM(_small_bert_config(config, len(demo.tokenizer)))
    else:
        mlm_model, _ = load_pretrained(transformers.AutoModelForMaskedLM, model)
    state, wall, cpu = _timed(
        fastft.pretrain, mlm_model, demo.tokenizer, {"train": demo.unlabeled, "validation": demo.heldout_text},
        objective="mlm", output_dir=run_dir, max_steps=config.pretrain_steps, batch_size=config.pretrain_batch_size,
        lr=config.pretrain_lr, schedule__warmup_ratio=0.06, block_size=config.max_length, packing=False,
        eval_every=max(1, config.pretrain_steps // 4), export=True, **common,
    )
    steps, losses, eval_steps, eval_losses = _train_curve(os.path.join(run_dir, "metrics.jsonl"))
    pretraining = {
        "steps": config.pretrain_steps, "wall_s": wall, "cpu_s": cpu, "path": state.export_path,
        "heldout_perplexity": state.last_eval.get("perplexity"),
        "loss_curve": {"step": steps, "loss": losses, "eval_step": eval_steps, "eval_loss": eval_losses},
        "parameters": sum(p.numel() for p in state.model.parameters()),
    }
    log(f"  pretraining: {config.pretrain_steps} steps in {wall:.1f}s (cpu {cpu:.1f}s), held-out masked-LM "
        f"perplexity {pretraining['heldout_perplexity']:.2f}")

    def perplexity(lm_model) -> float:
        # Unpacked documents and seed as in pretraining's evaluation: the same masks, so
        # "before" equals pretraining's last held-out perplexity.
        metrics = fastft.evaluate(lm_model, demo.heldout_text, "mlm", tokenizer=demo.tokenizer,
                                  batch_size=config.pretrain_batch_size, block_size=config.max_length, packing=False,
                                  seed=common["seed"])
        return float(metrics["perplexity"])

    pretraining["perplexity_before"] = perplexity(state.model)
    return pretraining, perplexity


def _finetune_run(config: DemoConfig, demo: DemoData, name: str, pretraining: dict, perplexity, run_dir: str,
                  common: dict) -> tuple[dict, list]:
    """One fine-tuning run (a strategy on the pretrained model, or ``scratch``: full
    fine-tuning of a randomly initialised copy). Returns its table row and accuracy curve."""
    import transformers

    import fastft
    from fastft.finetuning import ClassificationTask, lm_view

    pretrained_path = pretraining["path"]
    data = {"train": demo.train_rows, "validation": demo.validation_rows, "test": demo.test_rows}
    options = dict(task=ClassificationTask(labels=demo.classes, max_length=config.max_length), epochs=config.epochs,
                   batch_size=config.batch_size, eval_every=0, save=False, generate=False, select_metric="loss",
                   measure_forgetting=False, output_dir=run_dir, lr=config.lr[name], **common)
    if name == SCRATCH:
        torch.manual_seed(common["seed"])
        hf_config = transformers.AutoConfig.from_pretrained(
            pretrained_path, num_labels=len(demo.classes),
            id2label={i: str(c) for i, c in enumerate(demo.classes)},
            label2id={str(c): i for i, c in enumerate(demo.classes)},
        )
        scratch_model = transformers.AutoModelForSequenceClassification.from_config(hf_config)
        result, wall, cpu = _timed(fastft.finetune, scratch_model, demo.tokenizer, data, strategy="full", **options)
    else:
        strategy = config.lora if name == "lora" else name
        result, wall, cpu = _timed(fastft.finetune, pretrained_path, pretrained_path, data, strategy=strategy, **options)
    # The pretraining objective after fine-tuning: the fine-tuned backbone under the
    # pretrained MLM head (shared, see fastft.finetuning.guards.lm_view), same text and masks.
    pretrained = name != SCRATCH
    row = {
        "run": name,
        "init": "pretrained" if pretrained else "random",
        "test_accuracy": result.metrics["test"]["accuracy"],
        "validation_accuracy": result.metrics["validation"]["accuracy"],
        "trainable_params": sum(p.numel() for p in result.model.parameters() if p.requires_grad),
        "total_params": sum(p.numel() for p in result.model.parameters()),
        "wall_s": wall,
        "cpu_s": cpu,
        "perplexity_before": pretraining["perplexity_before"] if pretrained else None,
        "perplexity_after": perplexity(lm_view(result.model, pretrained_path)) if pretrained else None,
        "best_epoch_step": result.best_step,
    }
    return row, _curve(result.history)


def _config_dict(config: DemoConfig) -> dict:
    values = dataclasses.asdict(config)
    values["strategies"] = list(values["strategies"])
    return values


# ----------------------------------------------------------------------------- report


def format_table(rows: list[dict], pretraining: dict, chance: float, num_test: int) -> str:
    """The markdown table the demo prints and saves, with its footnotes."""

    def fmt(value, spec):
        return "n/a" if value is None else format(value, spec)

    lines = [
        "| run | held-out accuracy | validation accuracy | trainable params | time (s) | MLM ppl before | MLM ppl after |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    labels = {"full": "pretrained + full", "features": "pretrained + frozen features", "lora": "pretrained + LoRA",
              "gradual-unfreeze": "pretrained + gradual unfreezing", SCRATCH: "from scratch (same architecture)"}
    for row in rows:
        share = 100.0 * row["trainable_params"] / row["total_params"]
        lines.append(
            f"| {labels.get(row['run'], row['run'])} | {row['test_accuracy']:.3f} | {row['validation_accuracy']:.3f} | "
            f"{row['trainable_params']:,} ({share:.1f}%) | {row['wall_s']:.1f} | {fmt(row['perplexity_before'], '.2f')} | "
            f"{fmt(row['perplexity_after'], '.2f')} |"
        )
    lines += [
        "",
        f"Pretraining: {pretraining['steps']} masked-LM steps, {pretraining['wall_s']:.1f} s "
        f"(cpu {pretraining['cpu_s']:.1f} s), {pretraining['parameters']:,} parameters.",
        f"Held-out accuracy: on {num_test} test documents (chance {chance:.3f}); validation (labelled-set words) "
        "selects the epoch with the lowest validation loss.",
        "Trainable params: at the end of training (gradual unfreezing starts with the head alone).",
        "MLM ppl: masked-LM perplexity of the fine-tuned backbone + the pretrained MLM head on held-out unlabeled text, "
        "before / after fine-tuning (how much of the pretraining objective fine-tuning forgets). "
        "n/a for from scratch: it has no trained MLM head, so the number would measure nothing.",
    ]
    return "\n".join(lines)


def plot_demo(loss_curve: dict, curves: dict, chance: float, path: str) -> str:
    """Two panels: pretraining loss per step; held-out accuracy per epoch per run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    left.plot(loss_curve["step"], loss_curve["loss"], label="train")
    if loss_curve["eval_step"]:
        left.plot(loss_curve["eval_step"], loss_curve["eval_loss"], "o-", label="held-out")
    left.set(title="pretraining (masked-LM)", xlabel="step", ylabel="loss")
    left.legend()
    for name, points in curves.items():
        if points:
            epochs, accuracy = zip(*points)
            right.plot(epochs, accuracy, "o-" if name != SCRATCH else "s--", label=name)
    right.axhline(chance, color="gray", linestyle=":", label="chance")
    right.set(title="fine-tuning: held-out accuracy", xlabel="epoch", ylabel="accuracy", ylim=(0, 1.02))
    right.legend(loc="upper left", bbox_to_anchor=(1.02, 1.0))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# ----------------------------------------------------------------------------- CLI


def main(argv: Sequence[str] | None = None) -> int:
    config = DemoConfig()
    parser = argparse.ArgumentParser(
        prog="fastft demo",
        description="Pretrain a small BERT (masked-LM), fine-tune it four ways, compare with training from scratch.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Your own data" + __doc__.split("Your own data", 1)[1],
    )
    parser.add_argument("--out", default="demo_out", help="output directory (default: ./demo_out)")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N (default: auto)")
    parser.add_argument("--seed", type=int, default=0, help="data, initialisation and order (default: 0)")
    parser.add_argument("--model", help="masked-LM directory or Hub name to continue pretraining from")
    parser.add_argument("--data", nargs="+", help="unlabeled text files (.txt one document per line, .jsonl/.csv text)")
    parser.add_argument("--labels", help="labelled .csv / .jsonl with text,label (split 70/10/20 train/validation/test)")
    parser.add_argument("--pretrain-steps", type=int, help=f"pretraining steps (default {config.pretrain_steps})")
    parser.add_argument("--epochs", type=int, help=f"fine-tuning epochs (default {config.epochs})")
    parser.add_argument("--threads", type=int, default=1,
                        help="CPU threads for torch (default 1: the demo's matrices are only 64 wide, and on a busy "
                             "2-core machine 2 threads made each op ~10x slower than 1)")
    parser.add_argument("--progress", action="store_true", help="show progress bars")
    args = parser.parse_args(list(argv) if argv is not None else None)
    if args.threads < 1:
        parser.error(f"--threads must be >= 1, got {args.threads}")
    torch.set_num_threads(args.threads)

    if args.pretrain_steps is not None:
        config.pretrain_steps = args.pretrain_steps
    if args.epochs is not None:
        config.epochs = args.epochs
    started_wall, started_cpu = time.perf_counter(), time.process_time()
    result = run_demo(config, args.out, device=args.device, seed=args.seed, model=args.model, data=args.data,
                      labels=args.labels, progress=args.progress)
    print()
    print(result.table)
    print()
    print(f"total {time.perf_counter() - started_wall:.1f}s (cpu {time.process_time() - started_cpu:.1f}s); wrote "
          + ", ".join(result.files.values()))
    return 0
