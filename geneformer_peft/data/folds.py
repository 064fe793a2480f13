"""Cross-validation folds in the reference layout, and the label mapping.

Layout (kept as the reference wrote it, so data prepared for it loads unchanged)::

    <data_path>/<dataset_name>/<i>/<dataset_name>_train<i>.dataset
    <data_path>/<dataset_name>/<i>/<dataset_name>_val<i>.dataset
    <data_path>/<dataset_name>/<i>/<dataset_name>_test<i>.dataset

Splitting (:func:`split_folds`):

- Test sets partition the cells: ``StratifiedKFold(n_folds, shuffle=True, seed)``, so each
  class is spread over the test folds with per-fold counts differing by at most one.
- Validation is carved from the remaining cells of each fold, class by class:
  ``round(n_c * val_fraction)`` cells of class c, but always leaving at least one cell of
  the class in train.
- Rare classes are kept, never dropped. A class with fewer cells than folds cannot be in
  every test set (it is in some test sets and in the training part of the others); a
  class too small to give validation cells stays wholly in train. Both are reported by
  name with their counts (``logging`` warning, and in ``split_info.json``).
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from geneformer_peft.data.dataset_io import load_saved_dataset, save_dataset_atomically
from geneformer_peft.errors import DataError
from geneformer_peft.files import write_json

logger = logging.getLogger(__name__)

__all__ = ["SPLITS", "check_fold_files", "discover_folds", "fold_paths", "label_mapping", "load_fold", "split_folds"]

PathLike = str | Path
SPLITS = ("train", "val", "test")


def fold_paths(data_path: PathLike, dataset_name: str, fold: int) -> dict[str, Path]:
    """Return ``{"train": path, "val": path, "test": path}`` of fold ``fold`` in the reference layout."""
    fold_dir = Path(data_path) / dataset_name / str(fold)
    return {split: fold_dir / f"{dataset_name}_{split}{fold}.dataset" for split in SPLITS}


def discover_folds(data_path: PathLike, dataset_name: str) -> list[int]:
    """Fold numbers present under ``<data_path>/<dataset_name>/``.

    Raises
    ------
    DataError
        When there is none, saying which folders and files were looked for.
    """
    root = Path(data_path) / dataset_name
    folds = sorted(int(p.name) for p in root.glob("*") if p.is_dir() and p.name.isdigit()) if root.is_dir() else []
    if not folds:
        raise DataError(f"no folds found for dataset {dataset_name!r}: looked for folders 0, 1, ... under {root} "
                        f"holding {dataset_name}_train<i>.dataset, {dataset_name}_val<i>.dataset and "
                        f"{dataset_name}_test<i>.dataset (make them with `geneformer-peft split`)")
    return folds


def check_fold_files(data_path: PathLike, dataset_name: str, folds: list[int]) -> None:
    """Fail before any training when a requested fold lacks a split.

    Raises
    ------
    DataError
        Listing every path looked for and the missing ones.
    """
    for fold in folds:
        paths = fold_paths(data_path, dataset_name, fold)
        missing = [str(p) for p in paths.values() if not p.exists()]
        if missing:
            raise DataError(
                f"fold {fold} of dataset {dataset_name!r} under {data_path} is incomplete: missing {missing}; "
                f"looked for {[str(p) for p in paths.values()]}"
            )


def load_fold(data_path: PathLike, dataset_name: str, fold: int):
    """Load the train, val and test datasets of one fold.

    Returns
    -------
    (train, val, test) : tuple of datasets.Dataset

    Raises
    ------
    DataError
        Listing every path looked for when one is missing, or naming a directory that is
        not a saved dataset.
    """
    check_fold_files(data_path, dataset_name, [fold])
    paths = fold_paths(data_path, dataset_name, fold)
    return tuple(load_saved_dataset(paths[split]) for split in SPLITS)


def label_mapping(train, val, test, label_column: str = "cell_type") -> tuple[dict[Any, int], list[str]]:
    """Map labels to ids in sorted order of the names, over train, val and test together.

    Returns
    -------
    (label2id, warnings)
        ``warnings`` names every label found in val or test but not in train (each is
        also logged).
    """
    found = {}
    for name, dataset in (("train", train), ("val", val), ("test", test)):
        if label_column not in dataset.column_names:
            raise DataError(
                f"{name} dataset: label column {label_column!r} does not exist; "
                f"expected one of {dataset.column_names}"
            )
        found[name] = set(dataset.unique(label_column))
    all_labels = found["train"] | found["val"] | found["test"]
    if None in all_labels:
        raise DataError(f"label column {label_column!r} holds missing values (None); expected a label per cell")
    label2id = {label: i for i, label in enumerate(sorted(all_labels))}
    messages = []
    for split in ("val", "test"):
        for label in sorted(found[split] - found["train"]):
            messages.append(f"label {label!r} occurs in {split} but not in train")
    for message in messages:
        logger.warning(message)
    return label2id, messages


def _carve_validation(
    indices: np.ndarray, labels: np.ndarray, val_fraction: float, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray, dict[str, int]]:
    """Split ``indices`` into (train, val) class by class; return classes that gave no val cell."""
    train_parts, val_parts, no_val = [], [], {}
    for label in np.unique(labels[indices]):
        members = indices[labels[indices] == label]
        members = members[rng.permutation(len(members))]
        n_val = min(int(np.floor(len(members) * val_fraction + 0.5)), len(members) - 1)
        if n_val <= 0 and val_fraction > 0:
            no_val[str(label)] = len(members)
        val_parts.append(members[:max(n_val, 0)])
        train_parts.append(members[max(n_val, 0):])
    return np.sort(np.concatenate(train_parts)), np.sort(np.concatenate(val_parts)), no_val


def split_folds(
    dataset,
    *,
    dataset_name: str,
    output_dir: PathLike,
    n_folds: int = 5,
    label_column: str = "cell_type",
    seed: int = 0,
    val_fraction: float = 0.1,
    overwrite: bool = False,
    into: PathLike | None = None,
) -> list[dict[str, Path]]:
    """Split a tokenized dataset into stratified folds and save them in the reference layout.

    Parameters
    ----------
    dataset
        A ``datasets.Dataset`` with a label column.
    dataset_name
        Name used in the directory and file names.
    output_dir
        The ``data_path`` of the layout.
    n_folds
        Number of folds K (>= 2); the K test sets partition the cells.
    label_column
        Column to stratify on.
    seed
        Seed of the shuffles (the split is a pure function of data, seed and fractions).
    val_fraction
        Fraction of each fold's non-test cells, per class, moved to validation.
    overwrite
        Replace existing fold directories of this dataset name.
    into
        Write the content of ``<output_dir>/<dataset_name>/`` here instead: a temporary folder
        that the caller moves into place when complete (``geneformer-peft split`` does, under
        its run-safety guard, which also refuses an existing output); no existence check here.

    Returns
    -------
    list of dict
        The paths of each fold, as :func:`fold_paths` gives them.
    """
    from sklearn.model_selection import StratifiedKFold

    if label_column not in dataset.column_names:
        raise DataError(
            f"dataset: label column {label_column!r} does not exist; expected one of {dataset.column_names}"
        )
    if not 0 <= val_fraction < 1:
        raise DataError(f"val_fraction {val_fraction!r} is not valid; expected 0 <= val_fraction < 1")
    if n_folds < 2:
        raise DataError(f"n_folds {n_folds!r} is not valid; expected at least 2")
    labels = np.asarray([str(v) if v is not None else "None" for v in dataset[label_column]])
    if len(labels) < n_folds:
        raise DataError(f"dataset: {len(labels)} cells cannot fill n_folds={n_folds} test sets; expected more cells")
    root = Path(output_dir) / dataset_name
    targets = [fold_paths(output_dir, dataset_name, i) for i in range(n_folds)]
    existing = [str(p) for paths in targets for p in paths.values() if p.exists()]
    if existing and not overwrite and into is None:
        raise DataError(
            f"{root}: folds exist already ({existing[:3]}...); expected a new location (or overwrite=True)"
        )

    names, counts = np.unique(labels, return_counts=True)
    rare = {str(n): int(c) for n, c in zip(names, counts) if c < n_folds}
    if rare:
        logger.warning(
            "classes with fewer cells than folds (%d) are kept but cannot be in every test set: %s", n_folds, rare
        )
    if len(rare) == len(names):
        raise DataError(
            f"dataset: every class of {label_column!r} has fewer than n_folds={n_folds} cells ({rare}); "
            "expected fewer folds"
        )
    splitter = StratifiedKFold(n_splits=n_folds, shuffle=True, random_state=seed)
    rng = np.random.default_rng(seed)
    info: dict[str, Any] = {
        "dataset_name": dataset_name, "n_folds": n_folds, "label_column": label_column, "seed": seed,
        "val_fraction": val_fraction, "n_cells": int(len(labels)),
        "class_counts": {str(n): int(c) for n, c in zip(names, counts)}, "rare_classes": rare, "folds": [],
    }
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The least populated class", category=UserWarning)
        fold_indices = [test for _, test in splitter.split(np.zeros(len(labels)), labels)]
    for fold, test_idx in enumerate(fold_indices):
        rest = np.setdiff1d(np.arange(len(labels)), test_idx)
        train_idx, val_idx, no_val = _carve_validation(rest, labels, val_fraction, rng)
        if no_val:
            logger.warning("fold %d: classes too small to give validation cells stay in train: %s", fold, no_val)
        assert len(train_idx) + len(val_idx) + len(test_idx) == len(labels)
        paths = targets[fold]
        for split, idx in (("train", train_idx), ("val", val_idx), ("test", np.sort(test_idx))):
            target = paths[split] if into is None else Path(into) / paths[split].relative_to(root)
            save_dataset_atomically(dataset.select(idx.tolist()), target)
        info["folds"].append(
            {"fold": fold, "n_train": int(len(train_idx)), "n_val": int(len(val_idx)), "n_test": int(len(test_idx)),
             "classes_without_val": no_val}
        )
        logger.info("fold %d: %d train, %d val, %d test cells", fold, len(train_idx), len(val_idx), len(test_idx))
    write_json(Path(into if into is not None else root) / "split_info.json", info)
    return targets
