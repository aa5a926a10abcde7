"""``fastft <command> ...``: each command lives in its own module, imported only when run,
so ``fastft info`` stays quick and a broken optional piece cannot break the others."""

from __future__ import annotations

import importlib
import sys

# command -> (module with a ``main(argv)``, one-line help)
COMMANDS = {
    "demo": ("fastft.demo", "pretrain a small BERT, fine-tune it four ways and compare with from-scratch"),
    "pretrain": ("fastft.train.cli", "pretrain (masked-LM / causal-LM) from a YAML config"),
    "finetune": ("fastft.train.cli", "fine-tune on a labelled task from a YAML config"),
    "eval": ("fastft.train.cli", "evaluate a checkpoint (perplexity, accuracy, F1, exact match)"),
    "predict": ("fastft.train.cli", "run a fine-tuned model on new inputs"),
    "bench": ("fastft.bench", "run the benchmark suites against the reference implementations"),
    "info": ("fastft.info", "versions, and which backend of each op can run here and why not"),
}


def usage() -> str:
    width = max(map(len, COMMANDS))
    lines = ["usage: fastft <command> [options]", "", "commands:"]
    lines += [f"  {name:<{width}}  {help_}" for name, (_, help_) in COMMANDS.items()]
    lines += ["", "`fastft <command> --help` shows a command's options."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        print(f"fastft: unknown command {command!r}\n\n{usage()}", file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[command][0])
    result = module.main(rest) if module.__name__ != "fastft.train.cli" else module.main(command, rest)
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
