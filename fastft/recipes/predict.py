"""``fastft predict``: a fine-tuning bundle's predictions for new inputs.

    fastft predict --model runs/fastft/finetuned "a new sentence" "another one"
"""

from __future__ import annotations

import argparse
import json
import sys

from fastft.finetuning.bundle import predict

__all__ = ["main"]


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="fastft predict", description="Predictions of a fine-tuned bundle.")
    parser.add_argument("--model", required=True, help="a directory written by fastft finetune (…/finetuned)")
    parser.add_argument("inputs", nargs="+", help="texts (classification / regression / SFT prompts)")
    args = parser.parse_args(argv)
    outputs = predict(args.model, args.inputs)
    for text, output in zip(args.inputs, outputs):
        print(json.dumps({"input": text, "prediction": output}))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
