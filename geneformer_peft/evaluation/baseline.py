"""A linear baseline for every cross-validation fold: logistic regression on simple features.

A foundation model has to be shown against a linear model on the same folds. Per fold,
:func:`run_logreg_baseline` fits a scikit-learn ``LogisticRegression`` on the training
split for every ``C`` of a small grid, keeps the ``C`` with the best validation macro-F1
(ties: lower validation log-loss, then the smaller ``C``), and predicts the test split
once, after ``C`` is fixed. The fit is deterministic (lbfgs, fixed ``random_state``).

Features (``docs/baseline.md``):

``tokens`` (works on every tokenized dataset)
    A sparse bag of gene tokens: the gene at (1-based) rank ``r`` among the cell's gene
    tokens gets the value ``1 / sqrt(r)``; special tokens (``<pad>``, ``<mask>``, ``<cls>``,
    ``<eos>``) are left out and do not count towards the rank. The cell's tokens are the
    ones the model sees (after ``max_length``).
    On binned inputs (scBERT: position = panel gene, token = binned expression) the same
    option means the cell's binned expression itself: the value at column ``j`` is the
    token at position ``j`` (a bag of bin values would say nothing about the genes).
    On cells that carry expression values (CellFM: gene ids with their log1p values) it
    means those values: column ``id`` holds the gene's log1p value (:func:`value_features`).
``expression`` (when the dataset carries raw expression)
    ``log1p(counts / total * 10,000)``, the CellTypist recipe. A dataset carries raw
    expression in two list columns, ``expression_ids`` (feature ids, e.g. the genes'
    token ids, non-negative integers) and ``expression_values`` (the raw counts of those
    features, same length), plus an optional scalar column ``n_counts`` (the cell's total
    counts; default: the sum of ``expression_values``).
"""
from __future__ import annotations

import logging
import time
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import scipy.sparse as sp

from geneformer_peft.data.cells import EncodedCells
from geneformer_peft.errors import DataError
from geneformer_peft.evaluation.metrics import classification_metrics

logger = logging.getLogger(__name__)

__all__ = [
    "BASELINE_FEATURES",
    "BASELINE_ENCODINGS",
    "BASELINE_METHODS",
    "DEFAULT_C_GRID",
    "EXPRESSION_IDS",
    "EXPRESSION_VALUES",
    "N_COUNTS",
    "BaselineResult",
    "expression_features",
    "fold_baseline",
    "run_logreg_baseline",
    "select_and_fit",
    "special_token_ids",
    "binned_features",
    "token_features",
    "value_features",
]

BASELINE_METHODS = ("logreg", "none")
BASELINE_FEATURES = ("tokens", "expression")
#: how ``tokens`` features read a cell: ``rank`` (Geneformer's rank-value encoding),
#: ``binned`` (scBERT's fixed panel of binned expression) or ``values`` (CellFM's gene ids with values)
BASELINE_ENCODINGS = ("rank", "binned", "values")
#: regularisation strengths tried on the validation split (inverse of the L2 penalty)
DEFAULT_C_GRID = (0.01, 0.1, 1.0, 10.0, 100.0)
EXPRESSION_IDS = "expression_ids"
EXPRESSION_VALUES = "expression_values"
N_COUNTS = "n_counts"
TARGET_SUM = 10_000.0
MAX_ITER = 2000


def special_token_ids(token_dictionary: Mapping[str, int] | None) -> tuple[int, ...]:
    """Ids of the special tokens (``<...>``) of a token dictionary.

    Parameters
    ----------
    token_dictionary : mapping or None
        Token -> id. Without one, Geneformer's fixed ids are assumed: ``<pad>`` 0 and
        ``<mask>`` 1 (V1 and V2 alike).

    Returns
    -------
    tuple of int
        Sorted ids.
    """
    if token_dictionary is None:
        return (0, 1)
    from geneformer_peft.data.vocab import is_special_token

    return tuple(sorted(int(i) for t, i in token_dictionary.items() if is_special_token(str(t))))


def token_features(cells: EncodedCells, n_features: int, *,
                   special_ids: Iterable[int] = (0, 1)) -> sp.csr_matrix:
    """Sparse bag of gene tokens weighted by ``1 / sqrt(rank)``.

    Parameters
    ----------
    cells : EncodedCells
        Tokenized cells (their tokens after ``max_length``).
    n_features : int
        Number of columns (the vocabulary size); every token id must be below it.
    special_ids : iterable of int, default (0, 1)
        Token ids that are not genes: left out, not ranked.

    Returns
    -------
    scipy.sparse.csr_matrix, shape (n_cells, n_features), float64
        Row i holds ``1/sqrt(r)`` in the column of the gene at rank r of cell i (a gene
        repeated within a cell sums its values).

    Raises
    ------
    DataError
        If a token id is negative or not below ``n_features``.
    """
    n_cells = len(cells)
    special = np.asarray(sorted({int(i) for i in special_ids}), dtype=np.int64)
    rows, cols, vals = [], [], []
    for i in range(n_cells):
        tokens = cells.tokens(i).astype(np.int64, copy=False)
        genes = tokens[~np.isin(tokens, special)] if special.size else tokens
        rows.append(np.full(genes.shape[0], i, dtype=np.int64))
        cols.append(genes)
        vals.append(1.0 / np.sqrt(np.arange(1, genes.shape[0] + 1, dtype=np.float64)))
    col = np.concatenate(cols) if cols else np.zeros(0, dtype=np.int64)
    if col.size and (col.min() < 0 or col.max() >= n_features):
        bad = int(col.min() if col.min() < 0 else col.max())
        raise DataError(f"{cells.name}: token id {bad} is outside [0, {n_features}); expected ids of the "
                        "model's vocabulary")
    row = np.concatenate(rows) if rows else np.zeros(0, dtype=np.int64)
    val = np.concatenate(vals) if vals else np.zeros(0)
    matrix = sp.csr_matrix((val, (row, col)), shape=(n_cells, n_features))
    matrix.sum_duplicates()
    return matrix


def expression_features(dataset, n_features: int | None = None, *, name: str = "cells") -> sp.csr_matrix:
    """``log1p(counts / n_counts * 10,000)`` from a dataset's raw-expression columns.

    Parameters
    ----------
    dataset : datasets.Dataset
        With list columns ``expression_ids`` and ``expression_values`` and optionally
        ``n_counts`` (see the module docstring).
    n_features : int, optional
        Number of columns (default: the largest id + 1).
    name : str
        Used in error messages.

    Returns
    -------
    scipy.sparse.csr_matrix, shape (n_cells, n_features), float64

    Raises
    ------
    DataError
        If the columns are missing, lengths differ, counts are negative, a total is not
        positive, or an id does not fit ``n_features``.
    """
    columns = dataset.column_names
    missing = [c for c in (EXPRESSION_IDS, EXPRESSION_VALUES) if c not in columns]
    if missing:
        raise DataError(f"{name}: --baseline_features expression needs the columns {missing}, found {columns}; "
                        f"a dataset carries raw expression as '{EXPRESSION_IDS}' (feature ids) and "
                        f"'{EXPRESSION_VALUES}' (raw counts), see docs/baseline.md; or use --baseline_features tokens")
    ids = dataset[EXPRESSION_IDS]
    values = dataset[EXPRESSION_VALUES]
    totals = dataset[N_COUNTS] if N_COUNTS in columns else None
    rows, cols, vals = [], [], []
    for i, (cell_ids, cell_values) in enumerate(zip(ids, values)):
        cell_ids = np.asarray(cell_ids, dtype=np.int64)
        cell_values = np.asarray(cell_values, dtype=np.float64)
        if cell_ids.shape != cell_values.shape:
            raise DataError(f"{name}: row {i} has {cell_ids.size} {EXPRESSION_IDS} but {cell_values.size} "
                            f"{EXPRESSION_VALUES}; expected equal lengths")
        if cell_values.size and cell_values.min() < 0:
            raise DataError(f"{name}: row {i} has a negative count in {EXPRESSION_VALUES}; expected raw counts")
        total = float(totals[i]) if totals is not None else float(cell_values.sum())
        if not total > 0:
            raise DataError(f"{name}: row {i} has total counts {total} ({N_COUNTS if totals is not None else 'sum'});"
                            " expected a positive number")
        rows.append(np.full(cell_ids.size, i, dtype=np.int64))
        cols.append(cell_ids)
        vals.append(np.log1p(cell_values / total * TARGET_SUM))
    col = np.concatenate(cols) if cols else np.zeros(0, dtype=np.int64)
    if col.size and col.min() < 0:
        raise DataError(f"{name}: {EXPRESSION_IDS} holds {int(col.min())}; expected non-negative ids")
    width = int(col.max()) + 1 if n_features is None and col.size else (n_features or 1)
    if col.size and col.max() >= width:
        raise DataError(f"{name}: {EXPRESSION_IDS} holds {int(col.max())}; expected ids below {width}")
    matrix = sp.csr_matrix((np.concatenate(vals) if vals else np.zeros(0),
                            (np.concatenate(rows) if rows else np.zeros(0, dtype=np.int64), col)),
                           shape=(len(ids), width))
    matrix.sum_duplicates()
    return matrix


def _make_classifier(C: float, class_weight: dict[int, float] | None, seed: int):
    from sklearn.linear_model import LogisticRegression

    return LogisticRegression(C=C, class_weight=class_weight, max_iter=MAX_ITER, solver="lbfgs", random_state=seed)


def _full_probabilities(classifier, X: sp.csr_matrix, num_labels: int) -> np.ndarray:
    """Class probabilities over all ``num_labels`` ids (classes unseen in train get 0)."""
    part = classifier.predict_proba(X)
    probs = np.zeros((X.shape[0], num_labels), dtype=np.float64)
    probs[:, classifier.classes_.astype(np.int64)] = part
    return probs


def _log_loss(probs: np.ndarray, labels: np.ndarray) -> float:
    picked = probs[np.arange(len(labels)), labels]
    return float(-np.mean(np.log(np.clip(picked, 1e-15, 1.0))))


@dataclass
class BaselineResult:
    """One fold's baseline: test probabilities and predictions, metrics, and the C search."""

    probabilities: np.ndarray
    predictions: np.ndarray
    metrics: dict[str, Any]
    C: float
    val_scores: dict[float, float] = field(default_factory=dict)


def select_and_fit(X_train: sp.csr_matrix, y_train: np.ndarray, X_val: sp.csr_matrix, y_val: np.ndarray, *,
                   num_labels: int, class_weight: Sequence[float] | None = None,
                   c_grid: Sequence[float] = DEFAULT_C_GRID, seed: int = 0):
    """Fit one logistic regression per ``C`` on train and keep the best on validation.

    Parameters
    ----------
    X_train, X_val : sparse matrix
        Features of the training and validation cells.
    y_train, y_val : ndarray of int
        Label ids in ``[0, num_labels)``.
    num_labels : int
        Size of the label set.
    class_weight : sequence of float, optional
        Loss weight per label id (as the model's cross-entropy); None: unweighted.
    c_grid : sequence of float
        Inverse regularisation strengths to try.
    seed : int
        ``random_state`` of the classifier.

    Returns
    -------
    tuple
        ``(classifier, C, val_scores)``: the fitted classifier of the chosen ``C``, that
        ``C``, and the validation macro-F1 of every ``C``.

    Raises
    ------
    ValueError
        If the grid is empty or holds a non-positive ``C``, or train has one class only.
    """
    from geneformer_peft.evaluation.metrics import macro_f1

    grid = [float(c) for c in c_grid]
    if not grid or min(grid) <= 0:
        raise ValueError(f"c_grid {list(c_grid)}: expected one or more positive values")
    present = np.unique(y_train)
    if present.size < 2:
        raise ValueError(f"the training split holds {present.size} class; a logistic regression needs two or more")
    weights = None
    if class_weight is not None:
        weights = {int(c): float(class_weight[int(c)]) for c in present}
    best = None
    scores: dict[float, float] = {}
    for C in sorted(grid):
        classifier = _make_classifier(C, weights, seed)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # convergence notes of very weak penalties
            classifier.fit(X_train, y_train)
        if len(y_val):
            probs = _full_probabilities(classifier, X_val, num_labels)
            score = float(macro_f1(y_val, probs.argmax(axis=1), num_classes=num_labels))
            key = (score, -_log_loss(probs, y_val), -C)
        else:  # no validation cells: the default C = 1 (or the grid's closest)
            score = float("nan")
            key = (0.0, -abs(np.log(C)), -C)
        scores[C] = score
        if best is None or key > best[0]:
            best = (key, classifier, C)
    return best[1], best[2], scores


def run_logreg_baseline(train_X: sp.csr_matrix, train_y: np.ndarray, val_X: sp.csr_matrix, val_y: np.ndarray,
                        test_features, test_y: np.ndarray, *, label_names: Sequence[str],
                        class_weight: Sequence[float] | None = None, c_grid: Sequence[float] = DEFAULT_C_GRID,
                        seed: int = 0, features: str = "tokens") -> BaselineResult:
    """Select ``C`` on validation, then read and predict the test split once.

    Parameters
    ----------
    train_X, val_X : sparse matrix
        Features of the training and validation cells.
    train_y, val_y, test_y : ndarray of int
        Label ids.
    test_features : callable
        Called once, after ``C`` is chosen, to build the test features (so the test split
        cannot influence the choice).
    label_names : sequence of str
        Name of each label id.
    class_weight, c_grid, seed
        As in :func:`select_and_fit`.
    features : str
        Name of the feature kind, recorded in the metrics.

    Returns
    -------
    BaselineResult
        Metrics are :func:`~geneformer_peft.evaluation.metrics.classification_metrics` of
        the test split plus ``baseline``, ``features``, ``C``, ``val_macro_f1``,
        ``c_grid_val_macro_f1``, ``n_features`` and ``baseline_seconds``.
    """
    t0 = time.perf_counter()
    num_labels = len(label_names)
    classifier, C, scores = select_and_fit(train_X, np.asarray(train_y), val_X, np.asarray(val_y),
                                           num_labels=num_labels, class_weight=class_weight, c_grid=c_grid,
                                           seed=seed)
    X_test = test_features()
    probs = _full_probabilities(classifier, X_test, num_labels)
    preds = probs.argmax(axis=1)
    metrics = classification_metrics(np.asarray(test_y), preds, label_names=label_names, probabilities=probs)
    metrics.update({
        "baseline": "logreg", "features": features, "C": C,
        "val_macro_f1": scores[C],
        "c_grid_val_macro_f1": {f"{c:g}": s for c, s in scores.items()},
        "n_features": int(train_X.shape[1]),
        "baseline_seconds": time.perf_counter() - t0,
    })
    return BaselineResult(probabilities=probs, predictions=preds, metrics=metrics, C=C, val_scores=scores)


def binned_features(cells: EncodedCells, n_positions: int) -> sp.csr_matrix:
    """The binned expression of each cell as a sparse matrix over panel positions.

    Parameters
    ----------
    cells : EncodedCells
        Binned cells (one token per panel position: the gene's expression bin).
    n_positions : int
        Number of columns; every cell must have exactly this many tokens.

    Returns
    -------
    scipy.sparse.csr_matrix, shape (n_cells, n_positions), float64
        Row i, column j: the token of cell i at position j.

    Raises
    ------
    DataError
        If a cell's length is not ``n_positions``.
    """
    lengths = np.asarray(cells.lengths)
    if lengths.size and (lengths.min() != n_positions or lengths.max() != n_positions):
        bad = int(np.flatnonzero(lengths != n_positions)[0])
        raise DataError(f"{cells.name}: cell {bad} has {int(lengths[bad])} binned tokens; expected "
                        f"{n_positions} (one per panel position)")
    rows, cols, vals = [], [], []
    for i in range(len(cells)):  # only the nonzero bins: most of a panel is unexpressed
        tokens = cells.tokens(i)
        nonzero = np.flatnonzero(tokens)
        rows.append(np.full(nonzero.shape[0], i, dtype=np.int64))
        cols.append(nonzero)
        vals.append(tokens[nonzero].astype(np.float64))
    if not rows:
        return sp.csr_matrix((0, n_positions))
    return sp.csr_matrix((np.concatenate(vals), (np.concatenate(rows), np.concatenate(cols))),
                         shape=(len(cells), n_positions))


def value_features(cells: EncodedCells, n_features: int) -> sp.csr_matrix:
    """Each cell's expression values at its gene ids (the tokens the model sees).

    Parameters
    ----------
    cells : EncodedCells
        Cells with :attr:`~EncodedCells.values` (CellFM's encoding).
    n_features : int
        Number of columns (the vocabulary size); ids at or above it are left out.

    Returns
    -------
    scipy.sparse.csr_matrix, shape (n_cells, n_features), float64
        Row i, column g: cell i's value of gene id g (0 when not among its tokens).
    """
    if cells.values is None:
        raise DataError(f"{cells.name}: the values baseline needs cells with expression values (CellFM's encoding)")
    rows, cols, vals = [], [], []
    for i in range(len(cells)):
        tokens = cells.tokens(i).astype(np.int64)
        keep = tokens < n_features
        rows.append(np.full(int(keep.sum()), i, dtype=np.int64))
        cols.append(tokens[keep])
        vals.append(cells.token_values(i)[keep].astype(np.float64))
    if not rows:
        return sp.csr_matrix((0, n_features))
    return sp.csr_matrix((np.concatenate(vals), (np.concatenate(rows), np.concatenate(cols))),
                         shape=(len(cells), n_features))


def fold_baseline(cells: Mapping[str, EncodedCells], *, label_names: Sequence[str], features: str = "tokens",
                  encoding: str = "rank", n_features: int | None = None, special_ids: Iterable[int] = (0, 1),
                  datasets: Mapping[str, Any] | None = None, class_weight: Sequence[float] | None = None,
                  c_grid: Sequence[float] = DEFAULT_C_GRID, seed: int = 0,
                  num_threads: int | None = 1) -> BaselineResult:
    """The baseline of one fold, from its ``train``, ``val`` and ``test`` splits.

    Parameters
    ----------
    cells : mapping
        ``{"train": EncodedCells, "val": ..., "test": ...}`` with label ids.
    label_names : sequence of str
        Name of each label id.
    features : {"tokens", "expression"}
        Feature kind (see the module docstring).
    encoding : {"rank", "binned", "values"}, default "rank"
        How ``tokens`` features read the cells: a rank-weighted bag of gene tokens, the
        binned expression per panel position (:func:`binned_features`), or each gene's
        expression value at its id (:func:`value_features`).
    n_features : int, optional
        Width of the rank-value token features (the vocabulary size; default: the largest
        token id of the three splits + 1). For ``binned`` the width is the cells' length,
        for ``expression`` it comes from train and val.
    special_ids : iterable of int
        Token ids left out of the ``tokens`` features.
    datasets : mapping, optional
        The splits' ``datasets.Dataset`` objects (same keys), needed for ``expression``.
    class_weight, c_grid, seed
        As in :func:`select_and_fit`.
    num_threads : int or None, default 1
        BLAS/OpenMP threads of the fit (threadpoolctl); None leaves them as they are. The
        fits are small, and on a shared CPU more threads spin against each other (20x
        slower measured on 2 busy cores).

    Returns
    -------
    BaselineResult
        ``metrics["baseline_seconds"]`` covers building the features, the C search and the
        test prediction.

    Raises
    ------
    ValueError
        If ``features`` is unknown or ``datasets`` is missing for ``expression``.
    """
    t0 = time.perf_counter()
    if features not in BASELINE_FEATURES:
        raise ValueError(f"baseline features {features!r}: expected one of {list(BASELINE_FEATURES)}")
    for split in ("train", "val", "test"):
        if cells[split].labels is None:
            raise ValueError(f"{cells[split].name}: the baseline needs label ids")
    if encoding not in BASELINE_ENCODINGS:
        raise ValueError(f"baseline encoding {encoding!r}: expected one of {list(BASELINE_ENCODINGS)}")
    if features == "tokens" and encoding == "binned":
        n_positions = int(np.asarray(cells["train"].lengths).max()) if len(cells["train"]) else 0

        def build(split: str) -> sp.csr_matrix:
            return binned_features(cells[split], n_positions)
    elif features == "tokens" and encoding == "values":
        if n_features is None:
            n_features = 1 + max(int(c.flat.max()) if len(c.flat) else 0 for c in cells.values())

        def build(split: str) -> sp.csr_matrix:
            return value_features(cells[split], n_features)
    elif features == "tokens":
        if n_features is None:
            n_features = 1 + max(int(c.flat.max()) if len(c.flat) else 0 for c in cells.values())
        special = tuple(special_ids)

        def build(split: str) -> sp.csr_matrix:
            return token_features(cells[split], n_features, special_ids=special)
    else:
        if datasets is None:
            raise ValueError("--baseline_features expression needs the splits' datasets")
        width = max(_max_expression_id(datasets[s]) for s in ("train", "val")) + 1

        def build(split: str) -> sp.csr_matrix:
            matrix = expression_features(datasets[split], name=cells[split].name)
            # features never seen in train/val carry no weight: drop them, pad the rest
            matrix = matrix[:, :width] if matrix.shape[1] >= width else sp.hstack(
                [matrix, sp.csr_matrix((matrix.shape[0], width - matrix.shape[1]))], format="csr")
            return sp.csr_matrix(matrix)
    from threadpoolctl import threadpool_limits

    with threadpool_limits(limits=num_threads):
        result = run_logreg_baseline(build("train"), cells["train"].labels, build("val"), cells["val"].labels,
                                     lambda: build("test"), cells["test"].labels, label_names=label_names,
                                     class_weight=class_weight, c_grid=c_grid, seed=seed, features=features)
    result.metrics["baseline_seconds"] = time.perf_counter() - t0
    return result


def _max_expression_id(dataset) -> int:
    if EXPRESSION_IDS not in dataset.column_names:
        expression_features(dataset)  # raises the explanatory DataError
    top = -1
    for ids in dataset[EXPRESSION_IDS]:
        if len(ids):
            top = max(top, int(max(ids)))
    return top
