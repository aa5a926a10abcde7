"""Whole tensors from FSDP2-sharded ones, for writing adapters from a sharded model.

It lives here, below ``fastft.train``, because ``fastft.peft.io`` needs it and ``peft``
must not import ``train``; ``fastft.train`` may import it from here.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

__all__ = ["full_tensor", "is_writer"]


def full_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """The whole tensor behind an FSDP2-sharded parameter (a ``DTensor``), gathered from
    every rank's shard -- a collective: every rank must call it, in the same order. Other
    tensors are returned as they are (detached)."""
    # Imported here: torch.distributed.tensor takes about a second to import.
    from torch.distributed.tensor import DTensor

    tensor = tensor.detach()
    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def is_writer() -> bool:
    """Whether this process writes shared files: rank 0 of a process group, or the only process."""
    return not (dist.is_available() and dist.is_initialized() and dist.get_rank() != 0)
