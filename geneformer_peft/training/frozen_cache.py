"""Frozen-prefix activation caching.

When the embeddings and the first k encoder layers have no trainable parameter and no
prompt (full fine-tuning with ``freeze_layers``, adapters or LoRA only in later layers),
their output for a cell never changes. It is computed once per cell, kept, and later
epochs (and every validation pass) start at layer k. The frozen prefix always runs in
eval mode (no dropout), cached or not, so the cached forward equals the uncached one.
"""
from __future__ import annotations

import logging
import time

import torch
from torch.nn.utils.rnn import pad_sequence

logger = logging.getLogger(__name__)

__all__ = ["FrozenPrefixCache", "frozen_prefix_depth"]


def frozen_prefix_depth(model) -> int:
    """How many leading encoder layers (after frozen embeddings) have nothing to train
    (0 for a model without a BERT encoder: scBERT's Performer has no prefix cache)."""
    bert = getattr(model, "bert", None)
    if bert is None:
        return 0
    if any(p.requires_grad for p in bert.embeddings.parameters()):
        return 0
    if bert.adapter is not None and any(p.requires_grad for p in bert.adapter.parameters()):
        return 0
    depth = 0
    for layer in bert.encoder.layer:
        if layer.prompt_embeddings is not None or any(p.requires_grad for p in layer.parameters()):
            break
        depth += 1
    return depth


class FrozenPrefixCache:
    """Keeps each cell's output of the frozen prefix, per split, within a memory budget.

    Parameters
    ----------
    depth
        Number of frozen leading layers (k >= 1).
    budget_bytes
        Upper bound on the memory the cached activations take; cells beyond it are
        recomputed each time (logged once).
    storage
        Where cached activations live (``None``: the model's device).
    timed
        Accumulate the wall time spent computing prefix rows in ``compute_seconds``
        (synchronising CUDA around it; for benchmarks).
    """

    def __init__(self, depth: int, *, budget_bytes: int = 4 * 2**30, storage: torch.device | None = None,
                 timed: bool = False) -> None:
        self.depth = depth
        self.timed = timed
        self.compute_seconds = 0.0
        self.budget_bytes = budget_bytes
        self.storage = storage
        self.used_bytes = 0
        self.store: dict[str, dict[int, torch.Tensor]] = {}
        self._full_logged = False
        self.hits = self.misses = 0

    @classmethod
    def for_model(cls, model, **kwargs) -> FrozenPrefixCache | None:
        depth = frozen_prefix_depth(model)
        if depth == 0:
            return None
        logger.info("frozen-prefix cache: embeddings and the first %d of %d layers are frozen and unprompted; "
                    "their outputs are computed once per cell", depth, len(model.bert.encoder.layer))
        return cls(depth, **kwargs)

    def prepare(self, model) -> None:
        """Put the frozen prefix in eval mode (call after ``model.train()``)."""
        model.bert.embeddings.eval()
        if model.bert.adapter is not None:
            model.bert.adapter.eval()
        for layer in model.bert.encoder.layer[:self.depth]:
            layer.eval()

    @torch.no_grad()
    def prefix(self, model, input_ids, attention_mask) -> torch.Tensor:
        """Output of the frozen prefix, (B, L, d), computed (not cached)."""
        hidden = model.bert.embed(input_ids)
        return model.bert.encoder(hidden, attention_mask, end_layer=self.depth)[0]

    def _gather_or_compute(self, model, batch, input_ids, attention_mask) -> torch.Tensor:
        """(B, L, d) prefix output: cached rows as they are, missing rows computed (as one
        smaller batch) and stored while the budget allows."""
        split = self.store.setdefault(batch.get("split", "cells"), {})
        cells = batch["cells"].tolist()
        lengths = attention_mask.sum(dim=1).tolist()
        missing = [row for row, cell in enumerate(cells) if cell not in split]
        fresh: dict[int, torch.Tensor] = {}
        if missing:
            longest = int(max(lengths[row] for row in missing))
            index = torch.tensor(missing, device=input_ids.device)
            started = self._clock(input_ids.device)
            computed = self.prefix(model, input_ids[index, :longest], attention_mask[index, :longest])
            self.compute_seconds += self._clock(input_ids.device) - started
            for j, row in enumerate(missing):
                fresh[row] = computed[j, :int(lengths[row])]
                self._store(split, cells[row], fresh[row])
        self.misses += len(missing)
        self.hits += len(cells) - len(missing)
        rows = [fresh[row] if row in fresh else split[cell] for row, cell in enumerate(cells)]
        assert all(len(r) == n for r, n in zip(rows, lengths)), "cached rows do not match the batch's cells"
        hidden = pad_sequence([r.to(input_ids.device, non_blocking=True) for r in rows], batch_first=True)
        if hidden.shape[1] < input_ids.shape[1]:  # padding beyond the longest cell (pad_to_multiple_of)
            hidden = torch.nn.functional.pad(hidden, (0, 0, 0, input_ids.shape[1] - hidden.shape[1]))
        return hidden

    def _clock(self, device: torch.device) -> float:
        if not self.timed:
            return 0.0
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter()

    def _store(self, split: dict, cell: int, row: torch.Tensor) -> None:
        size = row.numel() * row.element_size()
        if self.used_bytes + size > self.budget_bytes:
            if not self._full_logged:
                logger.info("frozen-prefix cache full (%.2f GiB); further cells are recomputed",
                            self.used_bytes / 2**30)
                self._full_logged = True
            return
        split[cell] = row.to(self.storage or row.device, copy=True)
        self.used_bytes += size

    def forward(self, model, batch, device, runner=None) -> torch.Tensor:
        """Logits of ``model`` for ``batch``, starting at layer ``depth`` from cached activations.
        ``runner`` (e.g. the DistributedDataParallel wrapper of ``model``) runs the rest."""
        input_ids = batch["input_ids"].to(device, non_blocking=True)
        attention_mask = batch["attention_mask"].to(device, non_blocking=True)
        self.prepare(model)
        hidden = self._gather_or_compute(model, batch, input_ids, attention_mask)
        runner = runner if runner is not None else model
        return runner(input_ids, attention_mask, inputs_hidden=hidden, start_layer=self.depth).logits
