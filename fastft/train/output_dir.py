"""An output directory belongs to one run.

A run writes ``run_config.json``, ``metrics.jsonl``, ``checkpoints/``, ``curves.png`` and
its results (``final/``, ``finetuned/`` ...) into ``output_dir``. A new run pointed at a
directory that already holds another run's files would mix the two: metrics appended to
the old log, the old checkpoints counted by ``keep_last``, ``resume=auto`` loading the
other model. So:

- empty or missing: the directory is this run's;
- holding a run, with ``resume`` set: this run continues it (the checkpoint's model and
  data order are checked when it is loaded);
- holding a run, with ``overwrite=true``: the old run is moved aside to
  ``<output_dir>.previous-<date-time>`` (never deleted) and this run starts in a fresh one;
- holding a run otherwise: ``OutputDirInUse``, naming both ways on.

Recipes call ``check_output_dir`` first thing (a refusal costs no work and changes
nothing); ``train`` calls ``claim_output_dir``, which also moves an old run aside, just
before it writes. Under ``torchrun`` only rank 0 moves (every rank shares the directory).
"""

from __future__ import annotations

import datetime
import os

from fastft.errors import OutputDirInUse

__all__ = ["RUN_FILES", "check_output_dir", "claim_output_dir", "run_files"]

# What a run leaves in its output directory (anything else is not ours to judge).
RUN_FILES = ("run_config.json", "metrics.jsonl", "checkpoints", "curves.png", "final", "finetuned")

def run_files(output_dir: str) -> list[str]:
    """The run files present in ``output_dir`` (an empty ``checkpoints/`` does not count)."""
    if not os.path.isdir(output_dir):
        return []
    found = []
    for name in RUN_FILES:
        path = os.path.join(output_dir, name)
        if os.path.isdir(path) and not os.listdir(path):
            continue
        if os.path.exists(path):
            found.append(name)
    return found


def _is_rank_zero() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def check_output_dir(output_dir: str, *, resume=None, overwrite: bool = False) -> list[str]:
    """Refuse ``output_dir`` if it holds another run and neither ``resume`` nor
    ``overwrite`` is set; changes nothing. Returns the run files found.

    Raises:
        OutputDirInUse: naming the directory, what it holds and the two ways on.
    """
    output_dir = os.path.abspath(output_dir)
    found = run_files(output_dir)
    if found and not resume and not overwrite:
        raise OutputDirInUse(
            f"output_dir {output_dir} holds another run ({', '.join(found)}): continue it with resume=auto, or start "
            f"over with overwrite=true (the old run is moved to {output_dir}.previous-<date-time>, not deleted)"
        )
    return found


def claim_output_dir(output_dir: str, *, resume=None, overwrite: bool = False) -> str | None:
    """``check_output_dir``, then with ``overwrite`` (and no ``resume``) move the old run
    aside. Returns where it went, else None. Only rank 0 of a torchrun job moves."""
    found = check_output_dir(output_dir, resume=resume, overwrite=overwrite)
    if not found or resume or not _is_rank_zero():
        return None
    output_dir = os.path.abspath(output_dir)
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    moved, suffix = f"{output_dir}.previous-{stamp}", 1
    while os.path.exists(moved):
        moved, suffix = f"{output_dir}.previous-{stamp}-{suffix}", suffix + 1
    os.replace(output_dir, moved)
    return moved
