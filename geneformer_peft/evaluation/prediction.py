"""Prediction with a fine-tuned fold on new cells."""
from __future__ import annotations

import logging
from pathlib import Path

import pandas as pd

from geneformer_peft.data.cells import EncodedCells
from geneformer_peft.errors import DataError
from geneformer_peft.evaluation.inference import predict_logits, softmax
from geneformer_peft.evaluation.metrics import classification_metrics
from geneformer_peft.evaluation.outputs import predictions_frame, write_predictions_csv
from geneformer_peft.models.device import resolve_device
from geneformer_peft.models.loading import load_fold_model
from transformerslocal import BertConfig

logger = logging.getLogger(__name__)

__all__ = ["predict_cells"]


def predict_cells(model_path, dataset, *, output: str | Path | None = None, base_model=None,
                  label_column: str | None = "cell_type", batch_size: int = 64, device: str = "auto",
                  max_length: int | None = None) -> tuple[pd.DataFrame, dict | None]:
    """Predict every cell of ``dataset``; return the prediction table and, when the dataset
    has ``label_column``, the metrics against it."""
    dev = resolve_device(device)
    model = load_fold_model(model_path, base_model).to(dev)
    config: BertConfig = model.config
    names = [config.id2label[i] for i in range(config.num_labels)]
    has_labels = label_column is not None and label_column in dataset.column_names
    mapping = None
    if has_labels:
        values = sorted({str(v) for v in dataset.unique(label_column)})
        unknown = [v for v in values if v not in config.label2id]
        if unknown:
            raise DataError(f"column {label_column!r} holds labels the model was not trained on: {unknown}; "
                            f"model labels: {names}")
        mapping = {v: config.label2id[str(v)] for v in dataset.unique(label_column)}
    cells = EncodedCells.from_dataset(dataset, label_column=label_column if has_labels else None, label2id=mapping,
                                      max_length=max_length or config.finetune_max_length
                                      or config.max_position_embeddings, name="input")
    logits = predict_logits(model, cells, batch_size=batch_size, device=dev, progress=True)
    probs = softmax(logits)
    preds = probs.argmax(axis=1)
    truth = cells.labels if has_labels else None
    kwargs = dict(cell_index=cells.index, label_names=names, pred_ids=preds, probabilities=probs, true_ids=truth)
    if output is not None:
        write_predictions_csv(output, **kwargs)
    frame = predictions_frame(**kwargs)
    metrics = classification_metrics(truth, preds, label_names=names, probabilities=probs) if has_labels else None
    return frame, metrics
