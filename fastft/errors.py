"""The failures fastft expects a user to meet, each with a message that says what is wrong
and what to do, in one line. ``fastft <command>`` prints that line (no traceback; ``--debug``
shows it) and exits with status 2."""

from __future__ import annotations

import contextlib
import os

__all__ = ["FastftError", "ModelNotFound", "OutputDirInUse", "TrainingDiverged", "loading", "one_line"]


class FastftError(Exception):
    """Base of fastft's expected failures."""


class OutputDirInUse(FastftError):
    """A new run's output directory holds another run."""


class ModelNotFound(FastftError):
    """A model or tokenizer name that is neither a local directory nor reachable on the Hub."""


class TrainingDiverged(FastftError):
    """The loss or the gradient norm became NaN or infinite: the run stopped at that step."""


def one_line(error: BaseException) -> str:
    """``error``'s message as one line: a ``KeyError``'s text without its quotes, the first
    non-empty line of a multi-line message (Hugging Face's loading errors), the exception's
    class name when it has no message."""
    text = str(error.args[0]) if isinstance(error, KeyError) and error.args else str(error)
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[0] if lines else type(error).__name__


@contextlib.contextmanager
def loading(what: str, name):
    """Turn Hugging Face's ``OSError`` for a name it cannot load (no such directory, not on
    the Hub, offline; 40-100 lines of traceback) into one ``ModelNotFound`` line."""
    try:
        yield
    except OSError as error:
        if isinstance(name, str) and os.path.isdir(name):
            where = "a directory without the expected files"
        else:
            where = "neither a local directory nor a model the Hugging Face Hub gave (offline, or no such name)"
        raise ModelNotFound(f"{what} {name!r}: {where}: {one_line(error)}") from error

