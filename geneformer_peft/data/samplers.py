"""Index samplers that group cells of similar length, optionally class-balanced, and class weights.

Both samplers yield indices for a ``DataLoader(batch_size=...)``: consecutive runs of
``batch_size`` indices have similar lengths, so little padding is computed. Each epoch's
order is a pure function of ``seed`` and the epoch set with :meth:`set_epoch`. For
distributed training every rank builds the same global order and takes the interleaved
slice ``order[rank::num_replicas]`` (sizes equal; the order is padded by repeating its
start when not divisible, unless ``drop_last``), so at each step all ranks see batches of
similar length.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import Sampler

logger = logging.getLogger(__name__)

__all__ = ["BalancedLengthGroupedSampler", "LengthGroupedSampler", "ShuffledSampler", "class_weights", "group_by_length"]


def group_by_length(
    order: np.ndarray, lengths: np.ndarray, *, batch_size: int, mega_batch_mult: int = 50
) -> np.ndarray:
    """Sort ``order`` by length (descending) within consecutive mega-batches.

    The mega-batch holding the longest cell is moved first, so an out-of-memory error
    shows at the first step.
    """
    mega = max(1, batch_size * mega_batch_mult)
    chunks = [order[i : i + mega] for i in range(0, len(order), mega)]
    chunks = [chunk[np.argsort(-lengths[chunk], kind="stable")] for chunk in chunks]
    if chunks:
        longest = int(np.argmax([lengths[c[0]] for c in chunks]))
        chunks[0], chunks[longest] = chunks[longest], chunks[0]
    return np.concatenate(chunks) if chunks else order


class _DistributedMixin:
    """Shared epoch / rank handling."""

    def _init_distributed(self, num_replicas: int, rank: int, drop_last: bool, total: int) -> None:
        if num_replicas < 1 or not 0 <= rank < num_replicas:
            raise ValueError(f"rank {rank} / num_replicas {num_replicas} is not valid; expected 0 <= rank < num_replicas")
        self.num_replicas, self.rank, self.drop_last = num_replicas, rank, drop_last
        self.epoch = 0
        if drop_last:
            self.num_samples = total // num_replicas
        else:
            self.num_samples = int(math.ceil(total / num_replicas))
        self.total_size = self.num_samples * num_replicas

    def set_epoch(self, epoch: int) -> None:
        """Set the epoch; the order is a function of (seed, epoch)."""
        self.epoch = int(epoch)

    def _rng(self) -> np.random.Generator:
        return np.random.default_rng([self.seed, self.epoch])

    def _shard(self, order: np.ndarray) -> np.ndarray:
        if len(order) < self.total_size:
            repeats = int(math.ceil(self.total_size / max(len(order), 1)))
            order = np.tile(order, repeats)
        order = order[: self.total_size]
        return order[self.rank :: self.num_replicas]

    def __len__(self) -> int:
        return self.num_samples


class ShuffledSampler(_DistributedMixin, Sampler):
    """Plain shuffling, no length grouping; the order is a function of (seed, epoch).

    Parameters
    ----------
    n_cells
        Number of cells.
    seed
        Base seed.
    num_replicas, rank, drop_last
        Distributed sharding (see the module docstring).
    """

    def __init__(self, n_cells: int, *, seed: int = 0, num_replicas: int = 1, rank: int = 0,
                 drop_last: bool = False) -> None:
        self.n_cells, self.seed = int(n_cells), seed
        self._init_distributed(num_replicas, rank, drop_last, self.n_cells)

    def __iter__(self) -> Iterator[int]:
        return iter(self._shard(self._rng().permutation(self.n_cells)).tolist())


class LengthGroupedSampler(_DistributedMixin, Sampler):
    """Shuffle, then sort by length within mega-batches of ``mega_batch_mult * batch_size``.

    Parameters
    ----------
    lengths
        Length of each cell (e.g. ``dataset["length"]``).
    batch_size
        Per-device batch size.
    seed
        Base seed.
    mega_batch_mult
        Mega-batch size in batches (larger: less padding, less randomness).
    num_replicas, rank, drop_last
        Distributed sharding (see the module docstring).
    """

    def __init__(
        self,
        lengths: Sequence[int],
        batch_size: int,
        *,
        seed: int = 0,
        mega_batch_mult: int = 50,
        num_replicas: int = 1,
        rank: int = 0,
        drop_last: bool = False,
    ) -> None:
        self.lengths = np.asarray(lengths, dtype=np.int64)
        self.batch_size, self.seed, self.mega_batch_mult = batch_size, seed, mega_batch_mult
        self._init_distributed(num_replicas, rank, drop_last, len(self.lengths))

    def __iter__(self) -> Iterator[int]:
        order = self._rng().permutation(len(self.lengths))
        order = group_by_length(
            order, self.lengths, batch_size=self.batch_size * self.num_replicas, mega_batch_mult=self.mega_batch_mult
        )
        return iter(self._shard(order).tolist())


class BalancedLengthGroupedSampler(_DistributedMixin, Sampler):
    """Class-balanced sampling with replacement, then length grouping of the drawn cells.

    Each cell is drawn with weight ``1 / n_class(cell)`` (every class equally likely, as the
    reference's ``WeightedRandomSampler``), ``num_samples`` times with replacement; the drawn
    indices are then sorted by length within mega-batches.

    Parameters
    ----------
    lengths
        Length of each cell.
    labels
        Label of each cell (any hashable values).
    batch_size
        Per-device batch size.
    num_samples
        Cells drawn per epoch over all ranks (default: the dataset size).
    seed, mega_batch_mult, num_replicas, rank, drop_last
        As for :class:`LengthGroupedSampler`.
    """

    def __init__(
        self,
        lengths: Sequence[int],
        labels: Sequence[Any],
        batch_size: int,
        *,
        num_samples: int | None = None,
        seed: int = 0,
        mega_batch_mult: int = 50,
        num_replicas: int = 1,
        rank: int = 0,
        drop_last: bool = False,
    ) -> None:
        self.lengths = np.asarray(lengths, dtype=np.int64)
        labels = np.asarray(labels)
        if len(labels) != len(self.lengths):
            raise ValueError(f"{len(labels)} labels for {len(self.lengths)} lengths; expected one label per cell")
        _, inverse, counts = np.unique(labels, return_inverse=True, return_counts=True)
        weights = 1.0 / counts[inverse]
        self.probabilities = weights / weights.sum()
        self.batch_size, self.seed, self.mega_batch_mult = batch_size, seed, mega_batch_mult
        self.total_draws = len(self.lengths) if num_samples is None else int(num_samples)
        self._init_distributed(num_replicas, rank, drop_last, self.total_draws)

    def __iter__(self) -> Iterator[int]:
        rng = self._rng()
        drawn = rng.choice(len(self.lengths), size=self.total_draws, replace=True, p=self.probabilities)
        order = group_by_length(
            drawn, self.lengths, batch_size=self.batch_size * self.num_replicas, mega_batch_mult=self.mega_batch_mult
        )
        return iter(self._shard(order).tolist())


def class_weights(
    train_labels: Sequence[int], num_classes: int, *, id2label: dict | None = None
) -> torch.Tensor:
    """Class weights of the reference's weighted cross-entropy: ``w_c = (1 - n_c / N) ** 2``.

    ``n_c`` counts class c among the training labels (ids 0..num_classes-1), N their total.
    A class absent from train has ``n_c = 0`` and so weight 1.0 (the largest possible);
    it is warned about by name.

    Returns
    -------
    torch.FloatTensor of shape (num_classes,)
    """
    labels = np.asarray(train_labels, dtype=np.int64)
    if labels.size == 0:
        raise ValueError("train_labels is empty; expected at least one training label")
    if labels.min() < 0 or labels.max() >= num_classes:
        raise ValueError(
            f"train_labels hold id {int(labels.min() if labels.min() < 0 else labels.max())}; "
            f"expected ids in [0, {num_classes})"
        )
    counts = np.bincount(labels, minlength=num_classes)
    weights = (1.0 - counts / labels.size) ** 2
    for class_id in np.flatnonzero(counts == 0):
        name = id2label.get(int(class_id), class_id) if id2label else class_id
        logger.warning("class %r (id %d) is absent from train; its loss weight is 1.0", name, class_id)
    return torch.tensor(weights, dtype=torch.float32)
