"""``fastft eval``: held-out loss and perplexity of a language model on text, or a
fine-tuning bundle's task metrics on labelled sets.

    fastft eval --model runs/bert/final --data held_out.txt
    fastft eval --model runs/fastft/finetuned --data test=test.jsonl ood=ood.jsonl
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from fastft.finetuning.bundle import BUNDLE_FILE, load_finetuned
from fastft.finetuning.evaluation import evaluate_sets
from fastft.recipes.finetune import named_sets
from fastft.train.evaluation import evaluate
from fastft.train.objectives import objective_for
from fastft.train.runtime import resolve_device

__all__ = ["main"]


def main(argv: list[str]) -> int:
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
    if os.path.exists(os.path.join(args.model, BUNDLE_FILE)):
        return _report(_evaluate_bundle(args), args.output)
    return _report(_evaluate_language_model(args), args.output)


def _evaluate_language_model(args) -> dict:
    import transformers

    hf_config = transformers.AutoConfig.from_pretrained(args.model)
    objective = args.objective or objective_for(hf_config)
    auto = {
        "mlm": transformers.AutoModelForMaskedLM,
        "clm": transformers.AutoModelForCausalLM,
        "mlm+nsp": transformers.AutoModelForPreTraining,
    }[objective]
    model = auto.from_pretrained(args.model).to(resolve_device(args.device))
    tokenizer = transformers.AutoTokenizer.from_pretrained(args.tokenizer or args.model)
    metrics = evaluate(
        model,
        args.data if len(args.data) > 1 else args.data[0],
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
    return {"model": args.model, "objective": objective, **metrics}


def _evaluate_bundle(args) -> dict:
    """The task's metrics on labelled sets, from a fine-tuning bundle."""
    model, tokenizer, task = load_finetuned(args.model, device=resolve_device(args.device))
    sets = named_sets(args.data)
    for name, rows in sets.items():
        task.check_columns(rows, name)
        task.check_labels(rows, name)
    metrics = evaluate_sets(model, tokenizer, task, sets, batch_size=args.batch_size)
    return {"model": args.model, "task": task.name, "sets": metrics}


def _report(result: dict, output: str | None) -> int:
    """Print the metrics as JSON, and write them to ``output`` if given."""
    text = json.dumps(result, indent=2, default=str)
    print(text)
    if output:
        os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
        with open(output, "w") as f:
            f.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
