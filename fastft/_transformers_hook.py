"""``attn_implementation="fastft"`` after nothing but ``import fastft``.

``transformers`` resolves an attention implementation's name through two registries:
``AttentionInterface`` (in ``transformers.modeling_utils``) and ``AttentionMaskInterface``
(in ``transformers.masking_utils``). Importing those costs seconds, which ``import fastft``
must not pay when transformers is never used. So :func:`install` registers ``"fastft"``
in whichever of them is already imported and puts a finder on ``sys.meta_path`` that
wraps the loader of exactly those two modules: right after one of them has executed,
``fastft.models.attention.register_loaded`` registers into it. Any other import passes
through the finder untouched (one string comparison); the finder never imports anything
itself, so transformers loads in its own order.
"""

from __future__ import annotations

import importlib.abc
import logging
import sys

WATCHED = ("transformers.modeling_utils", "transformers.masking_utils")

logger = logging.getLogger("fastft.models")


def _register() -> None:
    try:
        from fastft.models.attention import register_loaded

        register_loaded()
    except Exception:  # noqa: BLE001 - never break the user's import of transformers
        logger.warning("fastft could not register attn_implementation='fastft' with transformers", exc_info=True)


class _RegisteringLoader(importlib.abc.Loader):
    """The watched module's own loader, then the registration."""

    def __init__(self, loader):
        self._loader = loader

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module):
        self._loader.exec_module(module)
        _register()

    def __getattr__(self, name):  # get_source, get_filename, ...: the wrapped loader's
        return getattr(self._loader, name)


class _RegisterOnImport(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path, target=None):
        if fullname not in WATCHED:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                if spec.loader is not None and hasattr(spec.loader, "exec_module"):
                    spec.loader = _RegisteringLoader(spec.loader)
                return spec
        return None


def install() -> None:
    """Register now into what is imported, and on import into what is not (idempotent)."""
    if any(module in sys.modules for module in WATCHED):
        _register()
    if not any(isinstance(finder, _RegisterOnImport) for finder in sys.meta_path):
        sys.meta_path.insert(0, _RegisterOnImport())
