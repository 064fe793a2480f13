"""Batches of binned cells (scBERT): stacking, and masking for masked expression modelling.

scBERT's pretraining masks, in every cell, ``ceil(0.15 * n)`` of its ``n`` non-zero
positions, drawn uniformly without replacement (zeros, the extra position included, are
never masked); each masked position becomes the mask token ``bin_num + 1`` with
probability 0.9 and keeps its token otherwise (no random replacement). Labels hold the
original token at masked positions and ``bin_num + 1`` (the ignore label) elsewhere.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from geneformer_peft.data.collator import WorkerGenerator

__all__ = ["BinnedMaskingCollator", "stack_binned"]


def stack_binned(sequences: Sequence[Sequence[int]]) -> torch.Tensor:
    """(B, L) long tensor of equal-length token sequences (uint8 on disk)."""
    arrays = [np.asarray(s, dtype=np.int64) for s in sequences]
    lengths = {len(a) for a in arrays}
    if len(lengths) > 1:
        raise ValueError(f"binned cells have {sorted(lengths)} positions; expected one length (gene_num + 1) "
                         "for every cell of a batch")
    return torch.from_numpy(np.stack(arrays)) if arrays else torch.zeros(0, 0, dtype=torch.long)


class BinnedMaskingCollator:
    """Stack and mask binned cells for scBERT's pretraining.

    Parameters
    ----------
    bin_num
        Highest bin (5); the mask token and the ignore label are ``bin_num + 1``.
    mask_prob
        Fraction of each cell's non-zero positions masked (rounded up): 0.15.
    replace_prob
        Of the masked positions, the probability of becoming the mask token (the rest keep
        their token): 0.9.
    seed
        Seed for reproducible masking (each DataLoader worker derives its own stream);
        ``None`` uses torch's global random state.

    Returns (``__call__``)
    ----------------------
    dict
        ``input_ids`` (B, L) long with masks applied and ``labels`` (B, L) long.
    """

    def __init__(self, *, bin_num: int = 5, mask_prob: float = 0.15, replace_prob: float = 0.9,
                 seed: int | None = None) -> None:
        if not 1 <= bin_num <= 254:
            raise ValueError(f"bin_num {bin_num!r} is not valid; expected an integer in [1, 254]")
        if not 0 < mask_prob < 1:
            raise ValueError(f"mask_prob {mask_prob!r} is not valid; expected 0 < p < 1")
        if not 0 <= replace_prob <= 1:
            raise ValueError(f"replace_prob {replace_prob!r} is not valid; expected 0 <= p <= 1")
        self.bin_num = int(bin_num)
        self.mask_token_id = self.bin_num + 1
        self.ignore_label = self.bin_num + 1
        self.mask_prob = float(mask_prob)
        self.replace_prob = float(replace_prob)
        self.seed = seed
        self._rng = WorkerGenerator(seed)

    def mask(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(masked input_ids, labels) for a (B, L) batch of tokens."""
        if input_ids.numel() and int(input_ids.max()) > self.bin_num:
            raise ValueError(f"input_ids hold token {int(input_ids.max())}; expected bins 0..{self.bin_num} "
                             f"(bin_num={self.bin_num}): is the data tokenized with another bin_num?")
        generator = self._rng()
        candidates = input_ids > 0
        n_masked = torch.ceil(candidates.sum(dim=1) * self.mask_prob).long()  # (B,)
        k = int(n_masked.max()) if len(n_masked) else 0
        chosen = torch.zeros_like(candidates)
        if k:
            # a uniform random subset of each row's candidates: the n_masked largest random scores
            scores = torch.rand(input_ids.shape, generator=generator).masked_fill_(~candidates, -1.0)
            picked = scores.topk(k, dim=1).indices  # (B, k), best first
            keep = torch.arange(k).unsqueeze(0) < n_masked.unsqueeze(1)
            chosen.scatter_(1, picked, keep)
        replace = chosen & (torch.rand(input_ids.shape, generator=generator) < self.replace_prob)
        masked = input_ids.masked_fill(replace, self.mask_token_id)
        labels = input_ids.masked_fill(~chosen, self.ignore_label)
        return masked, labels

    def __call__(self, features: list[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
        input_ids = stack_binned([f["input_ids"] for f in features])
        masked, labels = self.mask(input_ids)
        return {"input_ids": masked, "labels": labels}
