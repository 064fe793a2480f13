"""Batch collation: padding for cell classification, masking for masked-gene pretraining."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import torch

__all__ = ["MaskedLMCollator", "WorkerGenerator", "pad_input_ids"]

IGNORE_INDEX = -100


def pad_input_ids(
    sequences: Sequence[Sequence[int]],
    *,
    pad_token_id: int = 0,
    pad_to_multiple_of: int | None = None,
    max_length: int | None = None,
) -> dict[str, torch.Tensor]:
    """Pad token id lists to the longest (optionally rounded up to a multiple).

    Sequences longer than ``max_length`` are truncated to their first ``max_length``
    tokens. Returns ``input_ids`` (long) and ``attention_mask`` (long, 1 for tokens, 0 for
    padding), both (batch, length).
    """
    # numpy rows (as EncodedCells gives them) are copied whole; lists go through numpy once
    sequences = [np.asarray(s, dtype=np.int64)[:max_length] for s in sequences]
    longest = max((len(s) for s in sequences), default=0)
    if pad_to_multiple_of:
        longest = int(math.ceil(longest / pad_to_multiple_of) * pad_to_multiple_of)
    input_ids = np.full((len(sequences), longest), pad_token_id, dtype=np.int64)
    attention_mask = np.zeros((len(sequences), longest), dtype=np.int64)
    for row, sequence in enumerate(sequences):
        input_ids[row, :len(sequence)] = sequence
        attention_mask[row, :len(sequence)] = 1
    return {"input_ids": torch.from_numpy(input_ids), "attention_mask": torch.from_numpy(attention_mask)}


class MaskedLMCollator:
    """Pad and mask cells for Geneformer's masked-gene (BERT) objective.

    Of the real tokens (not padding, not special), each is chosen with probability
    ``mlm_probability``; of the chosen, 80% become ``<mask>``, 10% a random gene token and
    10% stay unchanged. ``labels`` hold the original id at chosen positions, -100 elsewhere.

    Parameters
    ----------
    token_dictionary
        The vocabulary; gives ``vocab_size``, ``mask_token_id``, ``pad_token_id`` and the
        special tokens (``<...>``) when given.
    vocab_size
        Needed when ``token_dictionary`` is not given.
    mask_token_id, pad_token_id
        Ids of ``<mask>`` and ``<pad>``.
    special_token_ids
        Ids never chosen nor drawn as random replacements (default: pad and mask, plus
        the ``<...>`` tokens of ``token_dictionary``).
    mlm_probability
        Fraction of real tokens chosen.
    pad_to_multiple_of, max_length
        As for :func:`pad_input_ids`.
    seed
        Seed for reproducible masking (each DataLoader worker derives its own stream);
        ``None`` uses torch's global random state.
    """

    def __init__(
        self,
        token_dictionary: Mapping[str, int] | None = None,
        *,
        vocab_size: int | None = None,
        mask_token_id: int = 1,
        pad_token_id: int = 0,
        special_token_ids: Iterable[int] | None = None,
        mlm_probability: float = 0.15,
        pad_to_multiple_of: int | None = None,
        max_length: int | None = None,
        seed: int | None = None,
    ) -> None:
        specials = {pad_token_id, mask_token_id}
        if token_dictionary is not None:
            vocab_size = max(int(v) for v in token_dictionary.values()) + 1
            mask_token_id = int(token_dictionary.get("<mask>", mask_token_id))
            pad_token_id = int(token_dictionary.get("<pad>", pad_token_id))
            specials = {pad_token_id, mask_token_id}
            specials |= {int(v) for k, v in token_dictionary.items() if k.startswith("<") and k.endswith(">")}
        if vocab_size is None:
            raise ValueError("MaskedLMCollator needs token_dictionary or vocab_size; got neither")
        if not 0 < mlm_probability < 1:
            raise ValueError(f"mlm_probability {mlm_probability!r} is not valid; expected 0 < p < 1")
        if special_token_ids is not None:
            specials = {int(i) for i in special_token_ids} | {pad_token_id, mask_token_id}
        self.vocab_size = int(vocab_size)
        self.mask_token_id = mask_token_id
        self.pad_token_id = pad_token_id
        self.special_token_ids = sorted(specials)
        self.mlm_probability = mlm_probability
        self.pad_to_multiple_of = pad_to_multiple_of
        self.max_length = max_length
        self.seed = seed
        is_gene = torch.ones(self.vocab_size, dtype=torch.bool)
        is_gene[[i for i in self.special_token_ids if i < self.vocab_size]] = False
        self._gene_ids = torch.nonzero(is_gene).flatten()
        self._special = torch.tensor(self.special_token_ids, dtype=torch.long)
        self._rng = WorkerGenerator(seed)

    def __call__(self, features: list[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
        batch = pad_input_ids(
            [f["input_ids"] for f in features],
            pad_token_id=self.pad_token_id,
            pad_to_multiple_of=self.pad_to_multiple_of,
            max_length=self.max_length,
        )
        input_ids = batch["input_ids"]
        generator = self._rng()
        candidates = batch["attention_mask"].bool() & ~torch.isin(input_ids, self._special)
        probabilities = torch.full(input_ids.shape, self.mlm_probability)
        chosen = torch.bernoulli(probabilities, generator=generator).bool() & candidates
        labels = torch.where(chosen, input_ids, torch.full_like(input_ids, IGNORE_INDEX))
        draw = torch.rand(input_ids.shape, generator=generator)
        to_mask = chosen & (draw < 0.8)
        to_random = chosen & (draw >= 0.8) & (draw < 0.9)
        random_genes = self._gene_ids[
            torch.randint(len(self._gene_ids), input_ids.shape, generator=generator)
        ]
        masked = input_ids.clone()
        masked[to_mask] = self.mask_token_id
        masked[to_random] = random_genes[to_random]
        batch["input_ids"] = masked
        batch["labels"] = labels
        return batch


class WorkerGenerator:
    """A masking collator's random generator: ``None`` without a seed, else one
    ``torch.Generator`` per DataLoader worker (seeded from the seed and the worker id, so that
    workers draw different masks and every run draws the same ones)."""

    def __init__(self, seed: int | None) -> None:
        self.seed = seed
        self._generator: torch.Generator | None = None
        self._owner: int | None = None

    def __call__(self) -> torch.Generator | None:
        if self.seed is None:
            return None
        info = torch.utils.data.get_worker_info()
        owner = -1 if info is None else info.id
        if self._generator is None or self._owner != owner:
            self._generator = torch.Generator().manual_seed(self.seed * 1_000_003 + owner + 1)
            self._owner = owner
        return self._generator
