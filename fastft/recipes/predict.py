"""``fastft predict``: a fine-tuning bundle's predictions for new inputs, with the class
probabilities of classification.

    fastft predict --model runs/fastft/finetuned "a new sentence" "another one"
    fastft predict --model runs/fastft/finetuned --file inputs.txt      # or .jsonl / .csv rows
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from fastft.data.loading import load_rows
from fastft.finetuning.bundle import load_finetuned, predict

__all__ = ["main"]


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="fastft predict", description="Predictions of a fine-tuned bundle, one JSON "
                                     "line per input (with class probabilities for classification).")
    parser.add_argument("--model", required=True, help="a directory written by fastft finetune (…/finetuned)")
    parser.add_argument("--file", help=".txt (one input per line) or .jsonl / .csv / .parquet rows with the task's "
                                       "columns (text [, text_pair] / prompt / question, context / tokens)")
    parser.add_argument("inputs", nargs="*", help="texts (classification / regression / SFT prompts)")
    parser.add_argument("--batch-size", type=int, default=16)
    args = parser.parse_args(argv)
    inputs = list(args.inputs) + (_read_inputs(args.file) if args.file else [])
    if not inputs:
        raise ValueError("no inputs: give texts or --file")
    model, tokenizer, task = load_finetuned(args.model)
    outputs = predict(model, inputs, tokenizer=tokenizer, task=task, batch_size=args.batch_size,
                      scores=task.has_scores)
    for item, output in zip(inputs, outputs):
        record = {"input": item, **(output if isinstance(output, dict) else {"prediction": output})}
        print(json.dumps(record, default=str))
    return 0


def _read_inputs(path: str) -> list:
    """Inputs from a file: a .txt's non-empty lines, or a table's rows."""
    if os.path.splitext(path)[1].lower() in (".txt", ".text"):
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{path}: no such file")
        with open(path, encoding="utf-8") as f:
            lines = [line.strip() for line in f if line.strip()]
        if not lines:
            raise ValueError(f"{path}: no inputs (empty, or only blank lines)")
        return lines
    return load_rows(path)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
