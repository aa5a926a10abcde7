"""From rows to device batches: the helpers every loop (training, evaluation, guards)
uses to take examples by index, collate them and move them to the model's device."""

from __future__ import annotations

from typing import Sequence

import torch

__all__ = ["count_tokens", "fetch", "to_device"]


def fetch(data, indices: Sequence[int]) -> list[dict]:
    """Examples ``indices`` of a ``datasets.Dataset`` (one columnar read) or a list of dicts."""
    if isinstance(data, (list, tuple)):
        return [data[i] for i in indices]
    columns = data[list(indices)]  # {column: [values]}
    names = list(columns)
    return [dict(zip(names, values)) for values in zip(*(columns[n] for n in names))]


def to_device(batch: dict, device: torch.device) -> dict:
    """Every tensor of ``batch`` on ``device`` (other values as they are)."""
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}


def count_tokens(batch: dict) -> int:
    """Input tokens of a collated batch, padding excluded."""
    mask = batch.get("attention_mask")
    return int(mask.sum()) if mask is not None else int(batch["input_ids"].numel())
