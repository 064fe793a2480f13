"""Batches of CellFM cells for masked-value pretraining.

Each cell is padded (ids with the pad id, values with 0); in every cell ``round(mask_ratio * n)``
(at least 1) of its ``n`` genes are drawn uniformly without replacement
(:func:`transformerslocal.modeling_cellfm.mask_values`), their values hidden from the model
(``value_mask``: the value embedding is replaced by ``mask_emb``; the gene id stays), and the
loss is the squared error of the predicted values there (``labels``: the true values).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from geneformer_peft.data.collator import WorkerGenerator

__all__ = ["CellFMMaskingCollator"]


class CellFMMaskingCollator:
    """Pad CellFM cells and draw the masked values.

    Parameters
    ----------
    mask_ratio
        Share of each cell's genes whose value is masked (CellFM: 0.2).
    pad_token_id
        Id of the padding gene row (0).
    seed
        Seed for reproducible masks (each DataLoader worker derives its own stream); ``None``
        uses torch's global random state.

    Returns (``__call__``)
    ----------------------
    dict
        ``input_ids`` (B, L) long, ``values`` (B, L) float32, ``attention_mask`` (B, L) long,
        ``value_mask`` (B, L) bool and ``labels`` (the values, (B, L) float32).
    """

    def __init__(self, *, mask_ratio: float = 0.2, pad_token_id: int = 0, seed: int | None = None) -> None:
        if not 0 < mask_ratio < 1:
            raise ValueError(f"mask_ratio {mask_ratio!r} is not valid; expected 0 < ratio < 1")
        self.mask_ratio = float(mask_ratio)
        self.pad_token_id = int(pad_token_id)
        self._rng = WorkerGenerator(seed)

    def __call__(self, features: list[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
        from geneformer_peft.data.cells import collate_cells
        from transformerslocal.modeling_cellfm import mask_values

        items = [{"input_ids": f["input_ids"], "values": f["values"], "cell": 0, "split": ""} for f in features]
        batch = collate_cells(items, pad_token_id=self.pad_token_id)
        value_mask = mask_values(batch["attention_mask"], self.mask_ratio, generator=self._rng())
        return {"input_ids": batch["input_ids"], "values": batch["values"], "attention_mask": batch["attention_mask"],
                "value_mask": value_mask, "labels": batch["values"]}
