"""scBERT's masking, measured over many cells: per cell exactly ceil(15%) of the non-zero
positions, never a zero, 90% of them the mask token and 10% kept, no random replacement."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from geneformer_peft.data.binned_collator import BinnedMaskingCollator, stack_binned

BIN_NUM = 5
MASK = BIN_NUM + 1


def cells(n: int, length: int, seed: int = 0) -> torch.Tensor:
    """Binned cells with ~60% zeros (as real panels) and the extra position 0."""
    rng = np.random.default_rng(seed)
    tokens = rng.integers(1, BIN_NUM + 1, size=(n, length))
    tokens[rng.random((n, length)) < 0.6] = 0
    tokens[:, -1] = 0
    return torch.from_numpy(tokens)


def test_masking_statistics_over_many_cells():
    ids = cells(400, 501)
    masked, labels = BinnedMaskingCollator(bin_num=BIN_NUM, seed=0).mask(ids)
    chosen = labels != MASK
    nonzero = ids > 0
    # labels: the original token where chosen, the ignore label (bin_num + 1) elsewhere
    assert torch.equal(labels[chosen], ids[chosen])
    # zeros (the extra position included) are never chosen; per cell exactly ceil(0.15 * non-zeros)
    assert not (chosen & ~nonzero).any() and not chosen[:, -1].any()
    assert torch.equal(chosen.sum(1), torch.ceil(nonzero.sum(1) * 0.15).long())
    # of the chosen: mask token or unchanged, never another token; 90% / 10% within 1.5 points
    # (n = 12,000 chosen positions: the standard deviation of the fraction is 0.27 points)
    replaced = masked == MASK
    assert torch.equal(replaced, chosen & replaced) and torch.equal(masked[~replaced], ids[~replaced])
    fraction = replaced[chosen].float().mean().item()
    assert chosen.sum() > 10_000 and abs(fraction - 0.9) < 0.015, fraction
    # uniform over the non-zero positions: every bin is chosen at ~15% (within 1.5 points), and
    # the first and second half of the positions alike
    for b in range(1, BIN_NUM + 1):
        rate = chosen[ids == b].float().mean().item()
        assert abs(rate - 0.15) < 0.015, (b, rate)
    half = ids.shape[1] // 2
    for part in (slice(0, half), slice(half, None)):
        rate = chosen[:, part][nonzero[:, part]].float().mean().item()
        assert abs(rate - 0.15) < 0.01, rate


def test_seeded_masks_repeat_and_cells_without_counts_stay_unmasked():
    ids = cells(8, 60, seed=1)
    ids[3] = 0
    a = BinnedMaskingCollator(seed=5).mask(ids)
    b = BinnedMaskingCollator(seed=5).mask(ids)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert (a[1][3] == MASK).all() and torch.equal(a[0][3], ids[3])


def test_collate_stacks_uint8_rows():
    features = [{"input_ids": np.array([0, 3, 5, 0], dtype=np.uint8)}, {"input_ids": [1, 1, 2, 0]}]
    batch = BinnedMaskingCollator(seed=0)(features)
    assert batch["input_ids"].dtype == torch.long and batch["input_ids"].shape == (2, 4)
    assert batch["labels"].shape == (2, 4)
    with pytest.raises(ValueError, match="positions; expected one length"):
        stack_binned([[0, 1], [0, 1, 2]])
    with pytest.raises(ValueError, match="token 9"):
        BinnedMaskingCollator(bin_num=5).mask(torch.tensor([[9, 0]]))
    assert math.isclose(BinnedMaskingCollator().mask_prob, 0.15)
