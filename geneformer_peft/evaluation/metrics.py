"""Classification metrics for cell-type prediction.

Every metric is computed over the full label set (``labels=range(len(label_names))``),
so a class absent from one split still has a row and a column in the confusion matrix
and a (zero-support) entry in the per-class report, and folds stay comparable.
Divisions by zero (a class never predicted, or never present) count as 0.

Names say what each number is: ``accuracy`` is plain accuracy, ``balanced_accuracy`` is the
mean per-class recall (the reference printed the latter under the name "accuracy").
The result is plain Python (floats, ints, lists, dicts), ready for :func:`json.dump`.
"""
from __future__ import annotations

import logging
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
from sklearn.exceptions import UndefinedMetricWarning
from sklearn.metrics import (
    accuracy_score,
    confusion_matrix,
    f1_score,
    precision_recall_fscore_support,
)

__all__ = ["classification_metrics", "macro_f1", "SCALAR_METRICS"]

logger = logging.getLogger(__name__)

#: Names of the scalar entries of :func:`classification_metrics`, in reporting order.
SCALAR_METRICS = (
    "accuracy",
    "balanced_accuracy",
    "macro_precision",
    "macro_recall",
    "macro_f1",
    "micro_precision",
    "micro_recall",
    "micro_f1",
    "weighted_f1",
)


def _as_label_ids(values: Any, *, name: str, num_classes: int) -> np.ndarray:
    """Return ``values`` as a 1-D int64 array of ids in ``[0, num_classes)``."""
    array = np.asarray(values)
    if array.ndim != 1:
        raise ValueError(f"{name} must be 1-dimensional, got shape {array.shape}")
    if array.size and not np.issubdtype(array.dtype, np.integer):
        if np.issubdtype(array.dtype, np.floating) and np.all(np.mod(array, 1) == 0):
            array = array.astype(np.int64)
        else:
            raise ValueError(f"{name} must hold integer label ids, got dtype {array.dtype}")
    array = array.astype(np.int64, copy=False)
    if array.size:
        low, high = int(array.min()), int(array.max())
        if low < 0 or high >= num_classes:
            raise ValueError(
                f"{name} holds label ids in [{low}, {high}]; expected ids in [0, {num_classes - 1}]"
            )
    return array


def _paired_label_ids(y_true: Any, y_pred: Any, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """Both label vectors checked as class ids and for equal length."""
    y_true_arr = _as_label_ids(y_true, name="y_true", num_classes=num_classes)
    y_pred_arr = _as_label_ids(y_pred, name="y_pred", num_classes=num_classes)
    if y_true_arr.shape != y_pred_arr.shape:
        raise ValueError(
            f"y_true and y_pred differ in length: {y_true_arr.shape[0]} vs {y_pred_arr.shape[0]}"
        )
    return y_true_arr, y_pred_arr


def _mean_recall(cm: np.ndarray) -> float:
    """Balanced accuracy: mean recall over the classes present in the true labels."""
    support = cm.sum(axis=1)
    present = support > 0
    if not present.any():
        return 0.0
    recalls = np.diag(cm)[present] / support[present]
    return float(recalls.mean())


def classification_metrics(
    y_true: Sequence[int] | np.ndarray,
    y_pred: Sequence[int] | np.ndarray,
    *,
    label_names: Sequence[str],
    probabilities: np.ndarray | None = None,
) -> dict[str, Any]:
    """Compute classification metrics over the full label set.

    Parameters
    ----------
    y_true : array-like of int, shape (n_cells,)
        True label ids, in ``[0, len(label_names))``.
    y_pred : array-like of int, shape (n_cells,)
        Predicted label ids.
    label_names : sequence of str
        Name of each label id (index = id). Every label is reported, including labels
        absent from this split.
    probabilities : ndarray, shape (n_cells, n_classes), optional
        Predicted class probabilities. When given, ``mean_confidence`` (mean of the row
        maxima) is added; the shape is checked.

    Returns
    -------
    dict
        ``accuracy``, ``balanced_accuracy``, ``macro_precision``, ``macro_recall``,
        ``macro_f1``, ``micro_precision``, ``micro_recall``, ``micro_f1``, ``weighted_f1``
        (floats); ``per_class`` (label name -> ``precision``, ``recall``, ``f1``,
        ``support``); ``confusion_matrix`` (list of lists, rows = true, columns =
        predicted, in label-id order); ``labels`` (names); ``n_cells`` (int).

    Notes
    -----
    ``balanced_accuracy`` is the mean recall over the classes that occur in ``y_true``
    (scikit-learn's definition); the macro averages run over all labels, with 0 for a
    class that has no support or no predictions.

    Raises
    ------
    ValueError
        If the inputs differ in length, are not integer ids in range, or
        ``probabilities`` has the wrong shape.
    """
    label_names = [str(name) for name in label_names]
    num_classes = len(label_names)
    if num_classes == 0:
        raise ValueError("label_names is empty; expected at least one label name")
    if len(set(label_names)) != num_classes:
        raise ValueError(f"label_names must be unique, got {label_names}")
    y_true_arr, y_pred_arr = _paired_label_ids(y_true, y_pred, num_classes)
    n_cells = int(y_true_arr.shape[0])
    if n_cells == 0:
        raise ValueError("y_true is empty; expected at least one cell")

    labels = list(range(num_classes))
    cm = confusion_matrix(y_true_arr, y_pred_arr, labels=labels)
    with warnings.catch_warnings():
        # zero_division=0 already defines the value; silence the noise about it.
        warnings.simplefilter("ignore", category=UndefinedMetricWarning)
        precision, recall, f1, support = precision_recall_fscore_support(
            y_true_arr, y_pred_arr, labels=labels, average=None, zero_division=0
        )
        averaged: dict[str, float] = {}
        for average in ("macro", "micro"):
            p, r, f, _ = precision_recall_fscore_support(
                y_true_arr, y_pred_arr, labels=labels, average=average, zero_division=0
            )
            averaged[f"{average}_precision"] = float(p)
            averaged[f"{average}_recall"] = float(r)
            averaged[f"{average}_f1"] = float(f)
        weighted = f1_score(
            y_true_arr, y_pred_arr, labels=labels, average="weighted", zero_division=0
        )

    result: dict[str, Any] = {
        "accuracy": float(accuracy_score(y_true_arr, y_pred_arr)),
        "balanced_accuracy": _mean_recall(cm),
        "macro_precision": averaged["macro_precision"],
        "macro_recall": averaged["macro_recall"],
        "macro_f1": averaged["macro_f1"],
        "micro_precision": averaged["micro_precision"],
        "micro_recall": averaged["micro_recall"],
        "micro_f1": averaged["micro_f1"],
        "weighted_f1": float(weighted),
    }
    if probabilities is not None:
        probs = np.asarray(probabilities, dtype=np.float64)
        if probs.shape != (n_cells, num_classes):
            raise ValueError(
                f"probabilities has shape {probs.shape}; expected ({n_cells}, {num_classes})"
            )
        result["mean_confidence"] = float(probs.max(axis=1).mean())
    result["per_class"] = {
        name: {
            "precision": float(precision[i]),
            "recall": float(recall[i]),
            "f1": float(f1[i]),
            "support": int(support[i]),
        }
        for i, name in enumerate(label_names)
    }
    result["confusion_matrix"] = cm.astype(int).tolist()
    result["labels"] = label_names
    result["n_cells"] = n_cells
    absent = [name for name, n in zip(label_names, support) if n == 0]
    if absent:
        logger.debug("labels absent from this split (support 0): %s", absent)
    return result


def macro_f1(
    y_true: Sequence[int] | np.ndarray,
    y_pred: Sequence[int] | np.ndarray,
    num_classes: int,
) -> float:
    """Macro-averaged F1 over ``num_classes`` labels, for validation model selection.

    Parameters
    ----------
    y_true, y_pred : array-like of int, shape (n_cells,)
        True and predicted label ids in ``[0, num_classes)``.
    num_classes : int
        Number of labels; every label counts in the average (0 for a class with no
        support and no predictions).

    Returns
    -------
    float
        The macro F1, 0.0 for empty inputs.
    """
    if int(num_classes) < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    y_true_arr, y_pred_arr = _paired_label_ids(y_true, y_pred, num_classes)
    if y_true_arr.size == 0:
        return 0.0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", category=UndefinedMetricWarning)
        return float(
            f1_score(
                y_true_arr,
                y_pred_arr,
                labels=list(range(num_classes)),
                average="macro",
                zero_division=0,
            )
        )
