"""Atomic, write-once outputs of a run: per-fold files and the cross-fold summary.

Every file is written to a temporary name in its final directory and moved into place
with :func:`os.replace`, so a reader (or a resumed run) sees either the old file or the
complete new one, never a half-written file. Model folders are built the same way with
:func:`atomic_directory`.

A fold counts as finished only when :data:`FOLD_DONE_MARKER` exists in its folder; the
marker is written last (:func:`mark_fold_done`), so a fold interrupted at any point before
that is redone on resume.

Layout of a fold folder (``docs/outputs.md`` describes every file)::

    predictions.csv      index, gt_celltype, pred_celltype, gt_cellcode, pred_cellcode,
                         confidence, prob_<label> ...
    predictions.pickle   labels, logits, probabilities, metrics
    metrics.json         see :func:`geneformer_peft.evaluation.metrics.classification_metrics`
    fold_done.json       written last
"""
from __future__ import annotations

import datetime as _dt
import io
import json
import logging
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from geneformer_peft.files import (
    atomic_directory,
    write_json,
    write_pickle,
    write_text,
)

__all__ = [
    "FOLD_DONE_MARKER",
    "SUMMARY_JSON",
    "SUMMARY_CSV",
    "write_json",
    "write_pickle",
    "write_text",
    "write_predictions_csv",
    "predictions_frame",
    "atomic_directory",
    "mark_fold_done",
    "is_fold_done",
    "summarize_folds",
    "summary_frame",
    "write_summary",
    "format_summary_table",
]

logger = logging.getLogger(__name__)

#: Name of the marker file that says a fold folder is complete.
FOLD_DONE_MARKER = "fold_done.json"
#: Names of the cross-fold summary files written by :func:`write_summary`.
SUMMARY_JSON = "summary.json"
SUMMARY_CSV = "summary.csv"

# ----------------------------------------------------------------------------- predictions


def predictions_frame(
    *,
    cell_index: Sequence[Any],
    label_names: Sequence[str],
    pred_ids: Sequence[int] | np.ndarray,
    probabilities: np.ndarray,
    true_ids: Sequence[int] | np.ndarray | None = None,
    cell_ids: Sequence[Any] | None = None,
) -> pd.DataFrame:
    """Build the per-cell predictions table written by :func:`write_predictions_csv`.

    See :func:`write_predictions_csv` for the parameters and columns.
    """
    label_names = [str(name) for name in label_names]
    num_classes = len(label_names)
    if num_classes == 0:
        raise ValueError("label_names is empty; expected at least one label name")
    index = list(cell_index)
    n_cells = len(index)
    preds = np.asarray(pred_ids)
    probs = np.asarray(probabilities, dtype=np.float64)
    if preds.shape != (n_cells,):
        raise ValueError(f"pred_ids has shape {preds.shape}; expected ({n_cells},) to match cell_index")
    if probs.shape != (n_cells, num_classes):
        raise ValueError(
            f"probabilities has shape {probs.shape}; expected ({n_cells}, {num_classes})"
        )

    def checked_ids(ids: np.ndarray, name: str) -> np.ndarray:
        if ids.size and (not np.issubdtype(ids.dtype, np.integer)
                         or ids.min() < 0 or ids.max() >= num_classes):
            raise ValueError(
                f"{name} must be integer label ids in [0, {num_classes - 1}], "
                f"got dtype {ids.dtype} with range [{ids.min()}, {ids.max()}]"
            )
        return ids.astype(np.int64, copy=False)

    preds = checked_ids(preds, "pred_ids")
    names = np.asarray(label_names, dtype=object)
    columns: dict[str, Any] = {"index": index}
    if cell_ids is not None:
        cell_ids = list(cell_ids)
        if len(cell_ids) != n_cells:
            raise ValueError(f"cell_ids has {len(cell_ids)} entries; expected {n_cells} to match cell_index")
        columns["cell_id"] = cell_ids
    if true_ids is not None:
        truth = np.asarray(true_ids)
        if truth.shape != (n_cells,):
            raise ValueError(
                f"true_ids has shape {truth.shape}; expected ({n_cells},) to match cell_index"
            )
        truth = checked_ids(truth, "true_ids")
        columns["gt_celltype"] = names[truth]
        columns["pred_celltype"] = names[preds]
        columns["gt_cellcode"] = truth
        columns["pred_cellcode"] = preds
    else:
        columns["pred_celltype"] = names[preds]
        columns["pred_cellcode"] = preds
    columns["confidence"] = probs.max(axis=1) if n_cells else np.zeros(0)
    for k, name in enumerate(label_names):
        column = f"prob_{name}"
        if column in columns:
            raise ValueError(f"label name {name!r} gives a duplicate column {column!r}")
        columns[column] = probs[:, k]
    return pd.DataFrame(columns)


def write_predictions_csv(
    path: str | os.PathLike,
    *,
    cell_index: Sequence[Any],
    label_names: Sequence[str],
    pred_ids: Sequence[int] | np.ndarray,
    probabilities: np.ndarray,
    true_ids: Sequence[int] | np.ndarray | None = None,
    cell_ids: Sequence[Any] | None = None,
) -> Path:
    """Write one row per cell with its prediction, atomically.

    Columns, in order: ``index``, ``cell_id`` (only with ``cell_ids``), ``gt_celltype``,
    ``pred_celltype``, ``gt_cellcode``,
    ``pred_cellcode``, ``confidence`` (the largest class probability), then
    ``prob_<label name>`` for every label in id order. Without ``true_ids`` the two
    ground-truth columns are left out.

    Parameters
    ----------
    path : path-like
        Destination CSV.
    cell_index : sequence
        Identifier of each cell (for example its row in the test dataset).
    label_names : sequence of str
        Name of each label id.
    pred_ids : array-like of int, shape (n_cells,)
        Predicted label ids.
    probabilities : ndarray, shape (n_cells, n_classes)
        Class probabilities (softmax of the logits).
    true_ids : array-like of int, shape (n_cells,), optional
        True label ids.
    cell_ids : sequence, optional
        Each cell's identifier from the dataset's ``cell_id`` column (e.g. its barcode).

    Returns
    -------
    pathlib.Path
        ``path``.

    Raises
    ------
    ValueError
        If lengths or shapes disagree or ids fall outside the label range.
    """
    frame = predictions_frame(
        cell_index=cell_index,
        label_names=label_names,
        pred_ids=pred_ids,
        probabilities=probabilities,
        true_ids=true_ids,
        cell_ids=cell_ids,
    )
    buffer = io.StringIO()
    frame.to_csv(buffer, index=False)
    return write_text(path, buffer.getvalue())


# ----------------------------------------------------------------------------- fold markers


def mark_fold_done(fold_dir: str | os.PathLike, *, info: Mapping[str, Any] | None = None) -> Path:
    """Write :data:`FOLD_DONE_MARKER` in ``fold_dir``; call it after every other output.

    The marker records the finishing time and the files present in the folder, which
    :func:`is_fold_done` checks again.

    Parameters
    ----------
    fold_dir : path-like
        The fold's output folder (must exist).
    info : mapping, optional
        Extra JSON-serialisable facts to store (for example the fold's headline metric).

    Returns
    -------
    pathlib.Path
        Path of the marker.
    """
    fold_dir = Path(fold_dir)
    if not fold_dir.is_dir():
        raise ValueError(f"fold_dir {fold_dir} is not an existing folder")
    files = sorted(
        entry.name
        for entry in fold_dir.iterdir()
        if entry.name != FOLD_DONE_MARKER and not entry.name.startswith(".")
    )
    record: dict[str, Any] = {
        "finished_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "files": files,
    }
    if info:
        record["info"] = dict(info)
    return write_json(fold_dir / FOLD_DONE_MARKER, record)


def is_fold_done(fold_dir: str | os.PathLike) -> bool:
    """Whether ``fold_dir`` holds a valid marker and every file the marker lists.

    Parameters
    ----------
    fold_dir : path-like
        The fold's output folder.

    Returns
    -------
    bool
        True for a finished fold; False when the folder, the marker, or a listed file is
        missing, or the marker is unreadable.
    """
    marker = Path(fold_dir) / FOLD_DONE_MARKER
    if not marker.is_file():
        return False
    try:
        record = json.loads(marker.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        logger.warning("unreadable fold marker %s (%s); the fold will be redone", marker, error)
        return False
    if not isinstance(record, dict):
        logger.warning("malformed fold marker %s; the fold will be redone", marker)
        return False
    missing = [name for name in record.get("files", []) if not (marker.parent / name).exists()]
    if missing:
        logger.warning("fold %s is marked done but misses %s; it will be redone", fold_dir, missing)
        return False
    return True


# ----------------------------------------------------------------------------- summary


def _is_scalar_number(value: Any) -> bool:
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(
        value, (bool, np.bool_)
    )


def _fold_column(fold_id: Any) -> str:
    text = str(fold_id)
    return text if text.startswith("fold_") else f"fold_{text}"


def summarize_folds(fold_metrics: Sequence[Mapping[str, Any]], fold_ids: Sequence[Any]) -> dict[str, Any]:
    """Mean and standard deviation of every scalar metric across folds.

    Scalars are the int and float entries of each fold's metrics (nested entries such as
    ``per_class`` and ``confusion_matrix``, strings and booleans are left out), in order of
    first appearance. A metric missing from some folds (or NaN there) is summarised over
    the folds that have it, and its missing values are ``None``.

    The standard deviation is the sample standard deviation (``ddof=1``) when two or more
    values are present, since folds are a sample of possible splits; with a single value
    it is 0.0.

    Parameters
    ----------
    fold_metrics : sequence of mapping
        One metrics dict per fold (as returned by
        :func:`~geneformer_peft.evaluation.metrics.classification_metrics`, possibly with extra
        scalars such as ``train_time_s``).
    fold_ids : sequence
        Id of each fold (for example ``[0, 1, 2, 3, 4]``); columns are named ``fold_<id>``.

    Returns
    -------
    dict
        ``{"folds": [column names], "fold_ids": [...], "n_folds": int, "std_ddof": 1,
        "metrics": {name: {"mean": float, "std": float, "n": int,
        "values": {"fold_<id>": float | None}}}}``.
    """
    fold_ids = list(fold_ids)
    if len(fold_metrics) != len(fold_ids):
        raise ValueError(
            f"got {len(fold_metrics)} fold metrics but {len(fold_ids)} fold ids; expected equal counts"
        )
    if not fold_metrics:
        raise ValueError("fold_metrics is empty; expected at least one fold")
    columns = [_fold_column(fold_id) for fold_id in fold_ids]
    if len(set(columns)) != len(columns):
        raise ValueError(f"fold ids must be unique, got {fold_ids}")

    names: list[str] = []
    for metrics in fold_metrics:
        for name, value in metrics.items():
            if _is_scalar_number(value) and name not in names:
                names.append(name)

    summary_metrics: dict[str, Any] = {}
    for name in names:
        values: dict[str, float | None] = {}
        present: list[float] = []
        for column, metrics in zip(columns, fold_metrics):
            value = metrics.get(name)
            if _is_scalar_number(value) and math.isfinite(float(value)):
                values[column] = float(value)
                present.append(float(value))
            else:
                values[column] = None
        if len(present) < len(columns):
            logger.warning("metric %r is missing from %d of %d folds", name,
                           len(columns) - len(present), len(columns))
        if present:
            mean = float(np.mean(present))
            std = float(np.std(present, ddof=1)) if len(present) > 1 else 0.0
        else:
            mean, std = None, None
        summary_metrics[name] = {"mean": mean, "std": std, "n": len(present), "values": values}
    return {
        "folds": columns,
        "fold_ids": fold_ids,
        "n_folds": len(columns),
        "std_ddof": 1,
        "metrics": summary_metrics,
    }


def summary_frame(summary: Mapping[str, Any]) -> pd.DataFrame:
    """The summary as a table: one row per metric; columns ``fold_*``, ``mean``, ``std``.

    With a baseline, ``baseline_<metric>`` and ``diff_<metric>`` (model minus baseline)
    rows follow (:func:`~geneformer_peft.evaluation.comparison.comparison_rows`)."""
    rows = {
        name: {**entry["values"], "mean": entry["mean"], "std": entry["std"]}
        for name, entry in summary["metrics"].items()
    }
    frame = pd.DataFrame.from_dict(rows, orient="index", columns=[*summary["folds"], "mean", "std"])
    frame.index.name = "metric"
    if summary.get("comparison"):
        from geneformer_peft.evaluation.comparison import comparison_rows

        frame = pd.concat([frame, comparison_rows(summary)])
        frame.index.name = "metric"
    return frame


def write_summary(run_dir: str | os.PathLike, summary: Mapping[str, Any]) -> tuple[Path, Path]:
    """Write ``summary.json`` and ``summary.csv`` into ``run_dir``, atomically.

    Parameters
    ----------
    run_dir : path-like
        The run's output folder (created if needed).
    summary : mapping
        As returned by :func:`summarize_folds`.

    Returns
    -------
    tuple of pathlib.Path
        Paths of the JSON and the CSV file. The CSV has one row per metric and columns
        ``metric``, ``fold_<id>`` ..., ``mean``, ``std``.
    """
    if "metrics" not in summary or "folds" not in summary:
        raise ValueError(f"summary must come from summarize_folds; got keys {sorted(summary)}")
    run_dir = Path(run_dir)
    json_path = write_json(run_dir / SUMMARY_JSON, summary)
    buffer = io.StringIO()
    summary_frame(summary).to_csv(buffer)
    csv_path = write_text(run_dir / SUMMARY_CSV, buffer.getvalue())
    return json_path, csv_path


def _format_number(value: float | None) -> str:
    if value is None:
        return "n/a"
    if abs(value) >= 1000:
        return f"{value:.1f}"
    if value != 0 and abs(value) < 1e-3:
        return f"{value:.3e}"
    return f"{value:.4f}"


def format_summary_table(summary: Mapping[str, Any]) -> str:
    """Render the summary as an aligned text table, ``metric  mean ± std``.

    Parameters
    ----------
    summary : mapping
        As returned by :func:`summarize_folds`.

    Returns
    -------
    str
        A header line naming the number of folds, then one line per metric. A metric
        measured on one fold only, or equal on every fold, is shown without a spread
        (``± 0.0000`` would suggest a measured variability).
    """
    metrics = summary["metrics"]
    n_folds = summary.get("n_folds", len(summary.get("folds", [])))
    header_name = "metric"
    name_width = max([len(header_name), *(len(name) for name in metrics)])
    means = {name: _format_number(entry["mean"]) for name, entry in metrics.items()}
    stds = {name: _format_number(entry["std"]) for name, entry in metrics.items() if _has_spread(entry)}
    mean_width = max([4, *(len(text) for text in means.values())])
    std_width = max([3, *(len(text) for text in stds.values())])
    std_header = f"   {'std':<{std_width}}" if stds else ""
    header = (
        f"{header_name:<{name_width}}  {'mean':>{mean_width}}{std_header}"
        f"   ({n_folds} fold{'s' if n_folds != 1 else ''})"
    )
    lines = [header, "-" * len(header)]
    for name in metrics:
        spread = f" ± {stds[name]:<{std_width}}" if name in stds else ""
        lines.append(f"{name:<{name_width}}  {means[name]:>{mean_width}}{spread}".rstrip())
    return "\n".join(lines)


def _has_spread(entry: Mapping[str, Any]) -> bool:
    """Whether a summarised metric has two or more values that are not all equal."""
    present = [v for v in entry.get("values", {}).values() if v is not None]
    return len(present) >= 2 and len(set(present)) > 1
