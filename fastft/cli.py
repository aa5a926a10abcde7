"""``fastft <command> ...``: one dispatch table. Each command is a module with ``main(argv)``,
imported only when run, so ``fastft info`` stays quick and a broken optional piece cannot
break the others. Expected failures (a missing file, a bad option value, an unknown
model) print one line on stderr and exit with status 2; ``--debug`` shows the traceback.
"""

from __future__ import annotations

import importlib
import os
import sys

from fastft.errors import FastftError, one_line

# command -> (module with a ``main(argv)``, one-line help)
COMMANDS = {
    "demo": ("fastft.recipes.demo", "pretrain a small BERT, fine-tune it four ways and compare with from-scratch"),
    "pretrain": ("fastft.recipes.pretrain", "pretrain (masked-LM / causal-LM) from a YAML config and key=value overrides"),
    "finetune": ("fastft.recipes.finetune", "fine-tune on a labelled task (classification, tagging, QA, SFT)"),
    "eval": ("fastft.recipes.evaluate", "evaluate a checkpoint (perplexity) or a fine-tuned bundle (task metrics)"),
    "align": ("fastft.recipes.align", "align a causal LM with preferences (DPO, IPO, SimPO, ORPO) or a reward (RLOO, GRPO)"),
    "predict": ("fastft.recipes.predict", "run a fine-tuned model on new inputs"),
    "active": ("fastft.recipes.active", "active learning: pick the rows worth labelling, fine-tune again; or simulate"),
    "bench": ("fastft.bench", "run the benchmark suites against the reference implementations"),
    "info": ("fastft.info", "versions, and which backend of each op can run here and why not"),
}
# What a user's input or environment can cause; anything else is a bug and keeps its traceback.
EXPECTED_ERRORS = (FastftError, ValueError, KeyError, TypeError, FileNotFoundError, NotADirectoryError,
                   IsADirectoryError, PermissionError)


def usage() -> str:
    width = max(map(len, COMMANDS))
    lines = ["usage: fastft [--debug] <command> [options]", "", "commands:"]
    lines += [f"  {name:<{width}}  {help_}" for name, (_, help_) in COMMANDS.items()]
    lines += ["", "`fastft <command> --help` shows a command's options; --debug shows tracebacks."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    argv = [a for a in argv if a != "--debug"]
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        print(f"fastft: unknown command {command!r}\n\n{usage()}", file=sys.stderr)
        return 2
    if command not in ("info", "bench"):
        # Download / "Loading weights" / datasets bars of every library call would bury the
        # loop's own progress bar and the one-line messages (read when those libraries load).
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
        os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    module = importlib.import_module(COMMANDS[command][0])
    try:
        return int(module.main(rest) or 0)
    except EXPECTED_ERRORS as error:
        if debug:
            raise
        print(f"fastft {command}: {one_line(error)}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
