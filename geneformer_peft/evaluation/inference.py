"""Inference over a split: logits in the split's own order, batched by length."""
from __future__ import annotations

import numpy as np
import torch
from tqdm.auto import tqdm

from geneformer_peft.data.cells import EncodedCells, StreamedCells, collate_cells, model_inputs
from geneformer_peft.models.device import autocast

__all__ = ["predict_logits", "softmax"]

@torch.no_grad()
def predict_logits(model, cells: EncodedCells | StreamedCells, *, batch_size: int, device: torch.device, precision: str = "fp32",
                   progress: bool = False, desc: str = "predict", encoder_cache=None) -> np.ndarray:
    """(n_cells, num_labels) float32 logits. Cells are run longest first in batches of
    similar length (little padding), then put back in their original order."""
    was_training = model.training
    model.eval()
    order = np.argsort(-cells.lengths, kind="stable")
    out = np.zeros((len(cells), model.config.num_labels), dtype=np.float32)
    batches = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    for idx in tqdm(batches, desc=desc, disable=None if progress else True, leave=False):
        batch = collate_cells(cells.items(idx))
        with autocast(device, precision):
            if encoder_cache is not None:
                logits = encoder_cache.forward(model, batch, device)
            else:
                logits = model(*model_inputs(batch, device)).logits
        out[idx] = logits.float().cpu().numpy()
    model.train(was_training)
    return out


def softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)
