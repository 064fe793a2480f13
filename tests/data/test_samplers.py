"""Samplers: length grouping, class balance, determinism, distributed shards; class weights."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch

from geneformer_peft.data.samplers import BalancedLengthGroupedSampler, LengthGroupedSampler, class_weights


def _mean_padding(order, lengths, batch_size):
    order = np.asarray(order)
    pads = []
    for i in range(0, len(order), batch_size):
        batch = lengths[order[i : i + batch_size]]
        pads.append((batch.max() - batch).mean())
    return float(np.mean(pads))


def test_length_grouped_sampler_reduces_padding_and_is_a_permutation():
    rng = np.random.default_rng(0)
    lengths = rng.integers(100, 2049, size=2000)
    sampler = LengthGroupedSampler(lengths, 16, seed=0, mega_batch_mult=20)
    order = list(sampler)
    assert sorted(order) == list(range(2000)) and len(sampler) == 2000
    random_order = rng.permutation(2000)
    assert _mean_padding(order, lengths, 16) < 0.1 * _mean_padding(random_order, lengths, 16)
    assert lengths[order[0]] == lengths.max()
    sampler.set_epoch(1)
    epoch1 = list(sampler)
    assert epoch1 != order
    again = LengthGroupedSampler(lengths, 16, seed=0, mega_batch_mult=20)
    again.set_epoch(1)
    assert list(again) == epoch1


@pytest.mark.parametrize("drop_last", [False, True])
def test_distributed_ranks_are_disjoint_and_equal(drop_last):
    lengths = np.arange(1, 103)
    shards = [list(LengthGroupedSampler(lengths, 4, seed=2, num_replicas=3, rank=r, drop_last=drop_last)) for r in range(3)]
    assert len({len(s) for s in shards}) == 1
    flat = [i for s in shards for i in s]
    assert len(set(flat)) == len(flat)  # 102 = 3 * 34: no padding needed
    lengths = np.arange(1, 101)  # 100 cells, 3 ranks
    shards = [list(LengthGroupedSampler(lengths, 4, seed=2, num_replicas=3, rank=r, drop_last=drop_last)) for r in range(3)]
    assert len({len(s) for s in shards}) == 1
    flat = [i for s in shards for i in s]
    if drop_last:
        assert len(set(flat)) == len(flat) == 99
    else:
        assert len(flat) == 102 and set(flat) == set(range(100))


def test_balanced_sampler_balances_classes_and_groups_lengths():
    rng = np.random.default_rng(1)
    labels = np.array(["A"] * 900 + ["B"] * 90 + ["C"] * 10)
    lengths = rng.integers(50, 2049, size=1000)
    sampler = BalancedLengthGroupedSampler(lengths, labels, 8, seed=0, mega_batch_mult=25)
    counts = {c: 0 for c in "ABC"}
    orders = []
    for epoch in range(5):
        sampler.set_epoch(epoch)
        order = list(sampler)
        assert len(order) == 1000
        orders.append(order)
        for c in labels[order]:
            counts[c] += 1
    proportions = np.array(list(counts.values())) / 5000
    assert np.all(np.abs(proportions - 1 / 3) < 0.03)
    assert orders[0] != orders[1]
    random_padding = _mean_padding(rng.permutation(1000), lengths, 8)
    assert _mean_padding(orders[0], lengths, 8) < 0.2 * random_padding

    shards = [list(BalancedLengthGroupedSampler(lengths, labels, 8, seed=0, num_samples=600, num_replicas=2, rank=r))
              for r in range(2)]
    assert len(shards[0]) == len(shards[1]) == 300
    sampler = BalancedLengthGroupedSampler(lengths, labels, 8, seed=0, num_samples=600)
    full = list(sampler)
    assert sorted(shards[0] + shards[1]) == sorted(full)  # the ranks split one global draw


def test_class_weights_formula(caplog):
    labels = [0] * 6 + [1] * 3 + [3]
    caplog.set_level(logging.WARNING, logger="geneformer_peft")
    weights = class_weights(labels, 4, id2label={2: "NK"})
    expected = torch.tensor([(1 - 0.6) ** 2, (1 - 0.3) ** 2, 1.0, (1 - 0.1) ** 2])
    assert weights.dtype == torch.float32
    assert torch.allclose(weights, expected)
    assert any("'NK'" in r.getMessage() for r in caplog.records)
    with pytest.raises(ValueError, match=r"expected ids in \[0, 2\)"):
        class_weights([0, 2], 2)
