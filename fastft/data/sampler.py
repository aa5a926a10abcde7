"""Deterministic, resumable batching.

Epoch ``e`` visits the examples in a permutation drawn from ``torch.Generator`` seeded
with ``seed + e``: the order depends only on (seed, epoch), never on what ran before, so
the data position is fully described by ``(epoch, batches consumed in the epoch)`` and a
resumed run skips exactly the batches the interrupted one had used, without touching them.
"""

from __future__ import annotations

from typing import Iterator

import torch

__all__ = ["EpochBatches"]


class EpochBatches:
    """Batches of example indices for each epoch.

    Args:
        num_examples: size of the dataset (> 0).
        batch_size: examples per batch (> 0); the last batch of an epoch may be smaller
            unless ``drop_last``.
        shuffle: permute per epoch (False: 0, 1, 2, ... every epoch).
        seed: base seed of the per-epoch permutation.

    Raises:
        ValueError: non-positive sizes, or ``drop_last`` leaving no batch.
    """

    def __init__(self, num_examples: int, batch_size: int, *, shuffle: bool = True, seed: int = 0, drop_last: bool = False):
        if num_examples < 1:
            raise ValueError(f"num_examples must be >= 1, got {num_examples}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if drop_last and num_examples < batch_size:
            raise ValueError(f"drop_last with {num_examples} examples < batch_size {batch_size} leaves no batch")
        self.num_examples = num_examples
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.seed = seed
        self.drop_last = drop_last

    def __len__(self) -> int:
        """Batches per epoch."""
        if self.drop_last:
            return self.num_examples // self.batch_size
        return -(-self.num_examples // self.batch_size)

    def order(self, epoch: int) -> torch.Tensor:
        """The example order of ``epoch``: (num_examples,) int64."""
        if not self.shuffle:
            return torch.arange(self.num_examples)
        generator = torch.Generator().manual_seed(self.seed + epoch)
        return torch.randperm(self.num_examples, generator=generator)

    def batches(self, epoch: int, start: int = 0) -> Iterator[list[int]]:
        """Index lists of ``epoch``'s batches, beginning at batch number ``start``."""
        order = self.order(epoch).tolist()
        for b in range(start, len(self)):
            yield order[b * self.batch_size : (b + 1) * self.batch_size]

    def state_dict(self) -> dict:
        return {"num_examples": self.num_examples, "batch_size": self.batch_size, "shuffle": self.shuffle, "seed": self.seed, "drop_last": self.drop_last}
