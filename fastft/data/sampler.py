"""Deterministic, resumable, shardable batching.

Epoch ``e`` visits the examples in a permutation drawn from ``torch.Generator`` seeded
with ``seed + e``: the order depends only on (seed, epoch), never on what ran before, so
the data position is fully described by ``(epoch, samples consumed in the epoch)`` and a
resumed run skips exactly the examples the interrupted one had used, without touching them.

Several ranks (data parallelism) walk the *same* permutation. The permutation is cut into
consecutive **global micro-batches** of ``batch_size * world_size`` examples and rank ``r``
takes every ``world_size``-th example of each, starting at ``r``::

    order of epoch e:   7 2 9 0 4 8 1 5 3 6 ...          (batch_size 2, world_size 2)
    global micro-batch: [7 2 9 0] [4 8 1 5] [3 6 ...
    rank 0 gets:         7   9     4   1     3 ...
    rank 1 gets:           2   0     8   5     6 ...

So the ranks' shards are disjoint, their union in a micro-step is exactly the batch one
process with ``batch_size * world_size`` would use (DDP/FSDP reproduce single-process
training), and the position is counted in *global samples*: a run saved with N ranks can
resume with M ranks (the rest of the permutation is cut with the new sizes).

Remainder (documented, at most ``world_size - 1`` examples per epoch): when the last
global micro-batch of an epoch holds fewer examples than there are ranks, it is dropped
(every rank must take part in every step); otherwise it is shared out, some ranks getting
one example fewer. ``drop_last`` drops any last global micro-batch smaller than the rest.
"""

from __future__ import annotations

from typing import Iterator

import torch

__all__ = ["EpochBatches"]

# What fixes the example order. A resumed run must agree on these; batch_size and
# world_size may change (the position is kept in global samples).
ORDER_KEYS = ("num_examples", "shuffle", "seed")


class EpochBatches:
    """Batches of example indices for each epoch, optionally sharded over ranks.

    Args:
        num_examples: size of the dataset (> 0).
        batch_size: examples per micro-batch *on each rank* (> 0); the last batch of an
            epoch may be smaller unless ``drop_last``.
        shuffle: permute per epoch (False: 0, 1, 2, ... every epoch).
        seed: base seed of the per-epoch permutation.
        drop_last: drop an epoch's last global micro-batch when it is smaller than the rest.
        world_size: number of data-parallel ranks (>= 1).
        rank: this process's rank, ``0 <= rank < world_size``.

    Raises:
        ValueError: non-positive sizes, a rank outside ``[0, world_size)``, or fewer
            examples than ranks (or, with ``drop_last``, than one global batch).
    """

    def __init__(
        self,
        num_examples: int,
        batch_size: int,
        *,
        shuffle: bool = True,
        seed: int = 0,
        drop_last: bool = False,
        world_size: int = 1,
        rank: int = 0,
    ):
        if num_examples < 1:
            raise ValueError(f"num_examples must be >= 1, got {num_examples}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, world_size): got rank {rank}, world_size {world_size}")
        if num_examples < world_size:
            raise ValueError(f"num_examples {num_examples} < world_size {world_size}: some rank would get no data")
        if drop_last and num_examples < batch_size * world_size:
            raise ValueError(
                f"drop_last with {num_examples} examples < batch_size {batch_size} x world_size {world_size} leaves no batch"
            )
        self.num_examples = num_examples
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.seed = seed
        self.drop_last = drop_last
        self.world_size = world_size
        self.rank = rank

    @property
    def global_batch_size(self) -> int:
        """Examples of one micro-step over all ranks."""
        return self.batch_size * self.world_size

    def __len__(self) -> int:
        """Global micro-batches per epoch (the same on every rank)."""
        return len(self.global_sizes(0))

    def global_sizes(self, start_sample: int = 0) -> list[int]:
        """Sizes of the global micro-batches of an epoch resumed at ``start_sample``."""
        remaining = max(self.num_examples - start_sample, 0)
        full, last = divmod(remaining, self.global_batch_size)
        sizes = [self.global_batch_size] * full
        if last and not self.drop_last and last >= self.world_size:
            sizes.append(last)
        return sizes

    def samples_per_epoch(self) -> int:
        """Examples used in an epoch started from its beginning (the rest is the remainder)."""
        return sum(self.global_sizes(0))

    def order(self, epoch: int) -> torch.Tensor:
        """The example order of ``epoch``: (num_examples,) int64, the same on every rank."""
        if not self.shuffle:
            return torch.arange(self.num_examples)
        generator = torch.Generator().manual_seed(self.seed + epoch)
        return torch.randperm(self.num_examples, generator=generator)

    def global_batches(self, epoch: int, start_sample: int = 0) -> Iterator[list[int]]:
        """Index lists of ``epoch``'s global micro-batches (all ranks together), beginning
        ``start_sample`` examples into the epoch's order."""
        order = self.order(epoch).tolist()
        begin = start_sample
        for size in self.global_sizes(start_sample):
            yield order[begin : begin + size]
            begin += size

    def shard(self, global_batch: list[int]) -> list[int]:
        """This rank's part of a global micro-batch: every ``world_size``-th example from ``rank``."""
        return global_batch[self.rank :: self.world_size]

    def batches(self, epoch: int, start: int = 0) -> Iterator[list[int]]:
        """This rank's index lists of ``epoch``'s micro-batches, beginning at micro-batch ``start``."""
        for b, global_batch in enumerate(self.global_batches(epoch)):
            if b >= start:
                yield self.shard(global_batch)

    def state_dict(self) -> dict:
        return {
            "num_examples": self.num_examples,
            "batch_size": self.batch_size,
            "shuffle": self.shuffle,
            "seed": self.seed,
            "drop_last": self.drop_last,
            "world_size": self.world_size,
        }
