"""Prediction with a fine-tuned fold on new cells."""
from __future__ import annotations

import logging
from pathlib import Path

import os

import numpy as np
import pandas as pd

from geneformer_peft.data.cells import EncodedCells, StreamedCells
from geneformer_peft.errors import DataError
from geneformer_peft.evaluation.inference import predict_logits, softmax
from geneformer_peft.evaluation.metrics import classification_metrics
from geneformer_peft.evaluation.outputs import predictions_frame
from geneformer_peft.files import atomic_file
from geneformer_peft.models.device import resolve_device
from geneformer_peft.models.families import check_input_lengths, family_of_config
from geneformer_peft.models.loading import load_fold_model

logger = logging.getLogger(__name__)

__all__ = ["UNASSIGNED", "predict_cells"]

#: the label of a cell whose top probability is below ``unassign_threshold``
UNASSIGNED = "Unassigned"
#: rows of predictions.csv formatted at a time
CSV_CHUNK_ROWS = 10_000


def predict_cells(model_path, dataset, *, output: str | Path | None = None, base_model=None,
                  label_column: str | None = "cell_type", batch_size: int = 64, device: str = "auto",
                  max_length: int | None = None, unassign_threshold: float | None = None,
                  allow_low_gene_overlap: bool = False, allow_other_base: bool = False
                  ) -> tuple[pd.DataFrame, dict | None]:
    """Predict every cell of ``dataset``; return the prediction table and, when the dataset
    has ``label_column``, the metrics against it.

    With ``unassign_threshold``, a cell whose largest class probability is below it gets the
    label ``Unassigned`` (``pred_celltype``; ``pred_cellcode`` -1), as scBERT's prediction
    does; the metrics are those of the arg-max labels of all cells (an unassigned cell has no
    class id), and the count of unassigned cells is logged. Both model families.

    The model and the cells are checked first (:func:`geneformer_peft.checks.check_compatibility`):
    a PEFT-only fold on another ``base_model`` than the one it was trained on is refused unless
    ``allow_other_base``; cells with few genes the model was pretrained on, unless
    ``allow_low_gene_overlap``.
    """
    from geneformer_peft.checks import check_compatibility

    if unassign_threshold is not None and not 0.0 <= float(unassign_threshold) <= 1.0:
        raise ValueError(f"unassign_threshold is {unassign_threshold!r}; expected a probability in [0, 1]")
    dev = resolve_device(device)
    files = getattr(dataset, "cache_files", None) or [{}]
    name = str(Path(files[0]["filename"]).parent) if files[0].get("filename") else "input"
    check_compatibility(model_path, {name: dataset}, base_model=base_model, max_length=max_length,
                        allow_low_gene_overlap=allow_low_gene_overlap,
                        allow_other_base=allow_other_base).raise_if_refused()
    model = load_fold_model(model_path, base_model).to(dev)
    config = model.config
    family = family_of_config(config)
    from geneformer_peft.evaluation.tasks import TaskSet

    tasks = TaskSet.from_config(config)
    if tasks is not None:
        return _predict_tasks(model, tasks, dataset, output=output, batch_size=batch_size, device=dev,
                              max_length=max_length, unassign_threshold=unassign_threshold)
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
    length = family.data_length(max_length or family.input_length(config))
    if family.values_column is not None:  # CellFM: ids and values, read whole (streaming reads ids only)
        cells = EncodedCells.from_dataset(dataset, label_column=label_column if has_labels else None,
                                          label2id=mapping, max_length=length, name="input",
                                          values_column=family.values_column)
        check_input_lengths(config, np.diff(cells.offsets), source="input")
    else:
        labels = None
        if has_labels:
            labels = np.array([mapping[v] for v in dataset[label_column]], dtype=np.int64)
        # tokens are read batch by batch from the memory-mapped dataset: memory flat in the number of cells
        cells = StreamedCells(dataset, labels=labels, max_length=length, name="input")
        check_input_lengths(config, cells.full_lengths, source="input")
    logits = predict_logits(model, cells, batch_size=batch_size, device=dev, progress=True)
    probs = softmax(logits)
    preds = probs.argmax(axis=1)
    truth = cells.labels if has_labels else None
    kwargs = dict(cell_index=cells.index, label_names=names, pred_ids=preds, probabilities=probs, true_ids=truth)
    frame = predictions_frame(**kwargs)
    if unassign_threshold is not None:
        below = probs.max(axis=1) < float(unassign_threshold)
        frame["pred_celltype"] = frame["pred_celltype"].astype(object)
        frame.loc[below, "pred_celltype"] = UNASSIGNED
        frame.loc[below, "pred_cellcode"] = -1
        logger.info("%d of %d cells below unassign_threshold=%g -> %s", int(below.sum()), len(frame),
                    float(unassign_threshold), UNASSIGNED)
    if output is not None:  # the table of write_predictions_csv (relabelled cells included), streamed
        _write_csv_in_chunks(frame, output)
    metrics = classification_metrics(truth, preds, label_names=names, probabilities=probs) if has_labels else None
    return frame, metrics


def _predict_tasks(model, tasks, dataset, *, output, batch_size: int, device, max_length: int | None,
                   unassign_threshold: float | None) -> tuple[pd.DataFrame, dict | None]:
    """:func:`predict_cells` of a multi-task fold: per task ``<task>_true`` (when the dataset has the
    task's column; empty where a cell lacks the label) and ``<task>_pred``, then ``<task>_confidence``
    and ``<task>_prob_<label>``; the metrics of the tasks whose column the dataset has (over the cells
    with a label), as a multi-task fold's metrics.json. ``unassign_threshold`` applies per task."""
    from geneformer_peft.evaluation.tasks import task_predictions_frame

    config = model.config
    family = family_of_config(config)
    present = [t for t in tasks if t.name in dataset.column_names]
    labels = tasks.encode(dataset, name="input", for_prediction=True) if present else None
    length = family.data_length(max_length or family.input_length(config))
    if family.values_column is not None:
        cells = EncodedCells.from_dataset(dataset, max_length=length, name="input", values_column=family.values_column)
        check_input_lengths(config, np.diff(cells.offsets), source="input")
    else:
        cells = StreamedCells(dataset, max_length=length, name="input")
        check_input_lengths(config, cells.full_lengths, source="input")
    logits = predict_logits(model, cells, batch_size=batch_size, device=device, progress=True)
    frame = task_predictions_frame(tasks, logits, cell_index=cells.index, true_ids=labels,
                                   truth_tasks={t.name for t in present})
    if unassign_threshold is not None:
        for task in tasks:
            below = frame[f"{task.name}_confidence"].to_numpy() < float(unassign_threshold)
            frame[f"{task.name}_pred"] = frame[f"{task.name}_pred"].astype(object)
            frame.loc[below, f"{task.name}_pred"] = UNASSIGNED
            logger.info("task %s: %d of %d cells below unassign_threshold=%g -> %s", task.name, int(below.sum()),
                        len(frame), float(unassign_threshold), UNASSIGNED)
    if output is not None:
        _write_csv_in_chunks(frame, output)
    metrics = tasks.metrics(labels, logits) if present else None
    if metrics is not None:
        metrics["tasks_without_column"] = [t.name for t in tasks if t not in present]
    return frame, metrics


def _write_csv_in_chunks(frame: pd.DataFrame, output: str | Path, rows: int = CSV_CHUNK_ROWS) -> None:
    """``frame.to_csv(output, index=False)``, atomically, formatting ``rows`` rows at a time
    (the same text as formatting the whole table at once, without holding it as one string)."""
    with atomic_file(output) as tmp_name, open(tmp_name, "w", encoding="utf-8", newline="") as handle:
        for start in range(0, max(len(frame), 1), rows):
            frame.iloc[start:start + rows].to_csv(handle, index=False, header=start == 0)
        handle.flush()
        os.fsync(handle.fileno())
