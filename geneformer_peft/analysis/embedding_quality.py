"""How well an embedding separates known labels: kNN accuracy and silhouette width.

- **kNN accuracy**: a k-nearest-neighbour classifier (Euclidean, ``k`` neighbours, majority
  vote) predicts each cell's label from the other cells; stratified 5-fold cross-validation
  (shuffled, seeded), reported as the mean and per-fold accuracy. Chance level is about the
  share of the largest class.
- **Silhouette width**: scikit-learn's ``silhouette_score`` with the labels as clusters
  (Euclidean), the mean over cells of ``(b - a) / max(a, b)``; 1 is perfectly separated,
  0 overlapping, negative mixed up.

These answer "did fine-tuning help?" on the same cells: compare a pretrained checkpoint,
a fine-tuned fold and a randomly initialised model.
"""
from __future__ import annotations

import logging
from typing import Any

import numpy as np

__all__ = ["embedding_quality"]

logger = logging.getLogger(__name__)


def embedding_quality(embeddings: np.ndarray, labels, *, n_folds: int = 5, k: int = 10, seed: int = 0
                      ) -> dict[str, Any]:
    """kNN label accuracy (stratified ``n_folds``-fold) and average silhouette width.

    Parameters
    ----------
    embeddings : ndarray, shape (n_cells, d)
    labels : array-like of length n_cells
    n_folds : int
        Folds of the kNN cross-validation (fewer when the smallest class has fewer cells).
    k : int
        Neighbours (fewer when a training fold is smaller).
    seed : int
        Seed of the fold split.

    Returns
    -------
    dict
        ``knn_accuracy``, ``knn_accuracy_std``, ``knn_accuracy_folds``, ``knn_k``, ``n_folds``,
        ``silhouette``, ``majority_class_share``, ``n_cells``, ``n_classes``, ``class_counts``;
        metrics that cannot be computed (one class, or a class of one cell for kNN) are None,
        with the reason in ``note``.
    """
    from sklearn.metrics import silhouette_score
    from sklearn.model_selection import StratifiedKFold
    from sklearn.neighbors import KNeighborsClassifier

    x = np.asarray(embeddings, dtype=np.float64)
    y = np.asarray(labels).astype(str)
    if x.ndim != 2 or len(x) != len(y):
        raise ValueError(f"embeddings of shape {x.shape} and {len(y)} labels; expected (n_cells, d) and n_cells labels")
    names, codes, counts = np.unique(y, return_inverse=True, return_counts=True)
    report: dict[str, Any] = {
        "n_cells": int(len(y)), "n_classes": int(len(names)),
        "class_counts": {str(n): int(c) for n, c in zip(names, counts)},
        "majority_class_share": float(counts.max() / len(y)) if len(y) else None,
        "knn_accuracy": None, "knn_accuracy_std": None, "knn_accuracy_folds": None, "knn_k": None,
        "n_folds": None, "silhouette": None,
    }
    notes = []
    if len(names) < 2:
        report["note"] = "one class only: no kNN accuracy or silhouette"
        return report
    if len(names) < len(y):
        report["silhouette"] = float(silhouette_score(x, codes, metric="euclidean"))
    folds = min(n_folds, int(counts.min()))
    if folds < 2:
        notes.append(f"the smallest class has {int(counts.min())} cell: no {n_folds}-fold kNN accuracy")
    else:
        if folds < n_folds:
            notes.append(f"{folds} folds (the smallest class has {int(counts.min())} cells)")
        split = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
        accuracies = []
        k_used = k
        for train, test in split.split(x, codes):
            k_used = min(k, len(train))
            knn = KNeighborsClassifier(n_neighbors=k_used).fit(x[train], codes[train])
            accuracies.append(float((knn.predict(x[test]) == codes[test]).mean()))
        report.update(knn_accuracy=float(np.mean(accuracies)), knn_accuracy_std=float(np.std(accuracies)),
                      knn_accuracy_folds=accuracies, knn_k=int(k_used), n_folds=int(folds))
    if notes:
        report["note"] = "; ".join(notes)
    return report
