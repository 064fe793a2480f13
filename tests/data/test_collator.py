"""Collators: padding, truncation, labels, BERT masking."""

from __future__ import annotations

import pytest
import torch

from geneformer_peft.data.collator import MaskedLMCollator, pad_input_ids
from geneformer_peft.errors import DataError


def test_padding_and_truncation():
    batch = pad_input_ids([[5, 6, 7], [8]])
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["input_ids"].dtype == torch.long

    batch = pad_input_ids([[5, 6, 7], [8]], pad_to_multiple_of=8, max_length=2)
    assert batch["input_ids"].tolist() == [[5, 6] + [0] * 6, [8] + [0] * 7]
    assert batch["attention_mask"].sum().item() == 3


def test_masked_lm_objective_statistics():
    tokens = {"<pad>": 0, "<mask>": 1, "<cls>": 2, "<eos>": 3, **{f"G{i}": 4 + i for i in range(96)}}
    collator = MaskedLMCollator(tokens, seed=0)
    features = [{"input_ids": [2] + list(range(4, 100)) + [3]} for _ in range(200)]
    features.append({"input_ids": [2, 50, 3]})
    original = pad_input_ids([f["input_ids"] for f in features])["input_ids"]
    batch = collator(features)
    labels, masked = batch["labels"], batch["input_ids"]
    chosen = labels != -100
    real = (original >= 4)
    assert not (chosen & ~real).any()  # never pad or special tokens
    assert torch.equal(labels[chosen], original[chosen])
    fraction = chosen.sum().item() / real.sum().item()
    assert 0.13 < fraction < 0.17
    to_mask = (masked == 1) & chosen
    unchanged = (masked == original) & chosen
    replaced = chosen & ~to_mask & ~unchanged
    n = chosen.sum().item()
    assert 0.77 < to_mask.sum().item() / n < 0.83
    assert 0.07 < unchanged.sum().item() / n < 0.13  # 10% kept (+ rare random draws of the same gene)
    assert 0.07 < replaced.sum().item() / n < 0.13
    assert (masked[replaced] >= 4).all()  # random replacements are genes
    assert torch.equal(masked[~chosen], original[~chosen])


def test_masked_lm_is_reproducible_with_seed():
    features = [{"input_ids": list(range(2, 60))} for _ in range(8)]
    a = MaskedLMCollator(vocab_size=64, seed=3)(features)
    b = MaskedLMCollator(vocab_size=64, seed=3)(features)
    assert torch.equal(a["input_ids"], b["input_ids"]) and torch.equal(a["labels"], b["labels"])
