"""``fastft pretrain`` / ``fastft eval`` / ``fastft finetune`` / ``fastft predict``.

    fastft pretrain --config run.yaml optim.lr=3e-4 data.block_size=64 max_steps=100
    fastft eval --model runs/bert/final --data held_out.txt
    fastft finetune --model runs/bert/final --train train.jsonl --eval dev=dev.jsonl --strategy lora
    fastft predict --model runs/fastft/finetuned "a new sentence"

``fastft.cli`` routes here with the command name first: ``main(command, argv)``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys

__all__ = ["main"]


def _valid_keys_text() -> str:
    from fastft.train.config import TrainConfig

    lines = []

    def walk(obj, prefix):
        for f in dataclasses.fields(obj):
            value = getattr(obj, f.name)
            if dataclasses.is_dataclass(value):
                walk(value, f"{prefix}{f.name}.")
            else:
                lines.append(f"  {prefix}{f.name} = {value!r}")

    walk(TrainConfig(), "")
    return "\n".join(lines)


def _pretrain(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="fastft pretrain",
        description="Pretrain a language model (masked-LM / causal-LM / +NSP) from a YAML config.",
        epilog="keys (default values):\n" + _valid_keys_text(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--config", help="YAML file mapped onto fastft.train.config.TrainConfig")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="e.g. optim.lr=3e-4 data.block_size=64")
    args = parser.parse_args(argv)

    from fastft.train.config import load_config

    try:
        config = load_config(args.config, args.overrides)
    except (KeyError, ValueError, TypeError) as error:
        message = error.args[0] if isinstance(error, KeyError) and error.args else error
        print(f"fastft pretrain: {message}", file=sys.stderr)
        return 2
    if not config.model.name_or_path:
        print("fastft pretrain: model.name_or_path is required (in the YAML or as an override)", file=sys.stderr)
        return 2
    if config.data.train is None:
        print("fastft pretrain: data.train is required (in the YAML or as an override)", file=sys.stderr)
        return 2

    from fastft.train.pretrain import pretrain

    state = pretrain(None, None, None, config=config)
    summary = {
        "step": state.step,
        "tokens_seen": state.tokens_seen,
        "train": state.last_train,
        "eval": state.last_eval,
        "checkpoint": state.checkpoint_path,
        "export": state.export_path,
    }
    if state.parallel is None or state.parallel.is_main:  # one summary, not one per rank
        print(json.dumps(summary, indent=2, default=str))
    return 0


def _objective_of(hf_config) -> str:
    """Guess the objective from a model config's architectures."""
    architectures = getattr(hf_config, "architectures", None) or []
    if any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in architectures):
        return "clm"
    if any(a.endswith("ForPreTraining") for a in architectures):
        return "mlm+nsp"
    if getattr(hf_config, "is_decoder", False):
        return "clm"
    return "mlm"


def _report(result: dict, output: str | None) -> int:
    """Print ``fastft eval``'s metrics as JSON, and write them to ``output`` if given."""
    text = json.dumps(result, indent=2, default=str)
    print(text)
    if output:
        os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
        with open(output, "w") as f:
            f.write(text + "\n")
    return 0


def _eval(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="fastft eval",
        description="Held-out loss and perplexity of a checkpoint or exported model on a text set; for a "
        "fine-tuning bundle (fastft finetune's …/finetuned), the task's metrics on labelled sets.",
    )
    parser.add_argument("--model", required=True, help="a fastft checkpoint directory, an export (final/), or a Hub name")
    parser.add_argument("--data", required=True, nargs="+",
                        help="text file(s) (.txt/.json/.jsonl/.csv/.parquet) or a Hub name; for a bundle: labelled "
                             "files, NAME=PATH to name them")
    parser.add_argument("--objective", choices=["mlm", "clm", "mlm+nsp"], help="default: from the model's architecture")
    parser.add_argument("--tokenizer", help="default: --model")
    parser.add_argument("--block-size", type=int, default=128)
    parser.add_argument("--no-packing", action="store_true", help="pad per batch instead of packing")
    parser.add_argument("--txt-mode", choices=["line", "paragraph"], default="line")
    parser.add_argument("--text-column", default="text")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-batches", type=int)
    parser.add_argument("--precision", choices=["fp32", "bf16", "fp16"], default="fp32")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--seed", type=int, default=0, help="seeds the evaluation masks (masked-LM)")
    parser.add_argument("--output", help="also write the metrics as JSON to this file")
    args = parser.parse_args(argv)
    from fastft.train.finetune import BUNDLE_FILE

    if os.path.exists(os.path.join(args.model, BUNDLE_FILE)):
        return _eval_finetuned(args)

    import transformers

    from fastft.train.loop import evaluate, resolve_device

    hf_config = transformers.AutoConfig.from_pretrained(args.model)
    objective = args.objective or _objective_of(hf_config)
    auto = {
        "mlm": transformers.AutoModelForMaskedLM,
        "clm": transformers.AutoModelForCausalLM,
        "mlm+nsp": transformers.AutoModelForPreTraining,
    }[objective]
    model = auto.from_pretrained(args.model).to(resolve_device(args.device))
    tokenizer = transformers.AutoTokenizer.from_pretrained(args.tokenizer or args.model)
    data = args.data if len(args.data) > 1 else args.data[0]
    metrics = evaluate(
        model,
        data,
        objective,
        tokenizer=tokenizer,
        batch_size=args.batch_size,
        max_batches=args.max_batches,
        precision=args.precision,
        seed=args.seed,
        block_size=args.block_size,
        packing=not args.no_packing,
        txt_mode=args.txt_mode,
        text_column=args.text_column,
    )
    return _report({"model": args.model, "objective": objective, **metrics}, args.output)


def _rows(path: str) -> list[dict]:
    """Labelled rows from a .json / .jsonl / .csv / .parquet file."""
    import datasets

    kind = {"jsonl": "json"}.get(path.rsplit(".", 1)[-1], path.rsplit(".", 1)[-1])
    return datasets.load_dataset(kind, data_files=path, split="train").to_list()


def _named_sets(entries: list[str]) -> dict[str, list[dict]]:
    """``["dev=dev.jsonl", "ood.jsonl"]`` -> ``{"dev": rows, "ood": rows}`` (name: the file's stem)."""
    sets = {}
    for entry in entries:
        name, path = entry.split("=", 1) if "=" in entry else (os.path.splitext(os.path.basename(entry))[0], entry)
        sets[name] = _rows(path)
    return sets


def _eval_finetuned(args) -> int:
    """``fastft eval`` on a fine-tuning bundle: the task's metrics on labelled sets."""
    from fastft.train.finetune import evaluate_sets, load_finetuned
    from fastft.train.loop import resolve_device

    try:
        model, tokenizer, task = load_finetuned(args.model, device=resolve_device(args.device))
        sets = _named_sets(args.data)
        for name, rows in sets.items():
            task.check_columns(rows, name)
            task.check_labels(rows, name)
        metrics = evaluate_sets(model, tokenizer, task, sets, batch_size=args.batch_size)
    except (KeyError, ValueError, TypeError, FileNotFoundError) as error:
        print(f"fastft eval: {error}", file=sys.stderr)
        return 2
    return _report({"model": args.model, "task": task.name, "sets": metrics}, args.output)


def _finetune(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="fastft finetune", description="Fine-tune a model on a labelled task.")
    parser.add_argument("--model", required=True)
    parser.add_argument("--tokenizer")
    parser.add_argument("--train", required=True, help=".json/.jsonl/.csv file of rows")
    parser.add_argument("--eval", nargs="*", default=[], metavar="NAME=PATH", help="named evaluation sets")
    parser.add_argument("--task", default="classification")
    parser.add_argument("--strategy", default="full")
    parser.add_argument("--strategy-options", default="{}", help="YAML mapping, e.g. '{rank: 8}'")
    parser.add_argument("--lr-scheme", choices=["discriminative", "layerwise"])
    parser.add_argument("--guard", choices=["replay", "l2sp", "ewc"])
    parser.add_argument("--pretraining-data", help="text file of unlabeled documents (one per line)")
    parser.add_argument("--config", help="YAML TrainConfig")
    parser.add_argument("overrides", nargs="*", metavar="key=value")
    args = parser.parse_args(argv)

    from fastft.train.config import load_config, parse_yaml
    from fastft.train.finetune import finetune

    try:
        config = load_config(args.config, args.overrides)
        data = {"train": _rows(args.train), **_named_sets(args.eval)}
        texts = open(args.pretraining_data).read().splitlines() if args.pretraining_data else None
        result = finetune(args.model, args.tokenizer or args.model, data, task=args.task, strategy=args.strategy,
                          config=config, strategy_options=parse_yaml(args.strategy_options) or {},
                          lr_scheme=args.lr_scheme, guard=args.guard, pretraining_data=texts)
    except (KeyError, ValueError, TypeError, FileNotFoundError) as error:
        print(f"fastft finetune: {error}", file=sys.stderr)
        return 2
    print(result.table())
    print(json.dumps({"best_step": result.best_step, "forgetting": result.forgetting, "saved": result.save_path}, indent=2))
    return 0


def _predict(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="fastft predict", description="Predictions of a fine-tuned bundle.")
    parser.add_argument("--model", required=True, help="a directory written by fastft finetune (…/finetuned)")
    parser.add_argument("inputs", nargs="+", help="texts (classification / regression / SFT prompts)")
    args = parser.parse_args(argv)
    from fastft.train.finetune import predict

    try:
        outputs = predict(args.model, args.inputs)
    except FileNotFoundError as error:  # not a bundle: say so, no traceback
        print(f"fastft predict: {error}", file=sys.stderr)
        return 2
    for text, output in zip(args.inputs, outputs):
        print(json.dumps({"input": text, "prediction": output}))
    return 0


def main(command: str, argv: list[str] | None = None) -> int:
    """Run ``command`` (``pretrain``, ``eval``, ``finetune``, ``predict``) with ``argv``."""
    argv = list(sys.argv[2:] if argv is None else argv)
    if command == "pretrain":
        return _pretrain(argv)
    if command == "eval":
        return _eval(argv)
    if command == "finetune":
        return _finetune(argv)
    if command == "predict":
        return _predict(argv)
    print(f"fastft: unknown training command {command!r}", file=sys.stderr)
    return 2
