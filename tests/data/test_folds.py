"""Cross-validation folds: partition, stratification, layout, rare classes, label mapping."""

from __future__ import annotations

import logging

import datasets
import pytest

from geneformer_peft.errors import DataError
from geneformer_peft.data.folds import fold_paths, label_mapping, load_fold, split_folds


def _dataset(class_sizes):
    labels = [name for name, size in class_sizes.items() for _ in range(size)]
    n = len(labels)
    return datasets.Dataset.from_dict(
        {"input_ids": [[2 + i % 7, 3] for i in range(n)], "length": [2] * n, "cell_type": labels, "cell_id": list(range(n))}
    )


def test_split_partition_stratification_layout(tmp_path, caplog):
    sizes = {"A": 53, "B": 31, "C": 12, "rare": 3}
    dataset = _dataset(sizes)
    caplog.set_level(logging.WARNING, logger="geneformer_peft")
    split_folds(dataset, dataset_name="toy", output_dir=tmp_path, n_folds=5, seed=0, val_fraction=0.1)
    assert any("rare" in r.getMessage() and "3" in r.getMessage() for r in caplog.records)

    test_ids = []
    for fold in range(5):
        fold_dir = tmp_path / "toy" / str(fold)
        parts = {s: datasets.load_from_disk(str(fold_dir / f"toy_{s}{fold}.dataset")) for s in ("train", "val", "test")}
        ids = {s: set(d["cell_id"]) for s, d in parts.items()}
        assert not (ids["train"] & ids["val"]) and not (ids["train"] & ids["test"]) and not (ids["val"] & ids["test"])
        assert len(ids["train"] | ids["val"] | ids["test"]) == dataset.num_rows
        test_ids.extend(parts["test"]["cell_id"])
        for name, size in sizes.items():  # stratified: within one cell of the expected count
            assert abs(parts["test"]["cell_type"].count(name) - size / 5) <= 1
        assert set(parts["train"]["cell_type"]) >= {"A", "B", "C"}
        assert len(parts["val"]) > 0
        assert parts["train"].column_names == dataset.column_names
    assert sorted(test_ids) == list(range(dataset.num_rows))  # test sets partition the cells
    assert (tmp_path / "toy" / "split_info.json").exists()

    train, val, test = load_fold(tmp_path, "toy", 2)
    assert test.num_rows + val.num_rows + train.num_rows == dataset.num_rows
    with pytest.raises(DataError, match="folds exist already"):
        split_folds(dataset, dataset_name="toy", output_dir=tmp_path, n_folds=5)
    split_folds(dataset, dataset_name="toy", output_dir=tmp_path, n_folds=5, seed=1, overwrite=True)


def test_split_is_deterministic(tmp_path):
    dataset = _dataset({"A": 20, "B": 10})
    split_folds(dataset, dataset_name="d", output_dir=tmp_path / "a", n_folds=3, seed=7)
    split_folds(dataset, dataset_name="d", output_dir=tmp_path / "b", n_folds=3, seed=7)
    a = load_fold(tmp_path / "a", "d", 1)
    b = load_fold(tmp_path / "b", "d", 1)
    assert [x["cell_id"] for x in a] == [x["cell_id"] for x in b]


def test_load_fold_errors(tmp_path):
    with pytest.raises(DataError, match=r"missing \[.*toy_train0\.dataset.*looked for"):
        load_fold(tmp_path, "toy", 0)
    for path in fold_paths(tmp_path, "toy", 0).values():
        path.mkdir(parents=True)
    with pytest.raises(DataError, match=r"toy_train0\.dataset: directory is not a dataset saved with save_to_disk"):
        load_fold(tmp_path, "toy", 0)


def test_split_errors(tmp_path):
    dataset = _dataset({"A": 3, "B": 2})
    with pytest.raises(DataError, match=r"label column 'label' does not exist"):
        split_folds(dataset, dataset_name="x", output_dir=tmp_path, label_column="label")
    with pytest.raises(DataError, match=r"every class of 'cell_type' has fewer than n_folds=5"):
        split_folds(dataset, dataset_name="x", output_dir=tmp_path, n_folds=5)


def test_label_mapping_warns_about_unseen_labels(caplog):
    train = datasets.Dataset.from_dict({"cell_type": ["b", "a", "b"]})
    val = datasets.Dataset.from_dict({"cell_type": ["a", "c"]})
    test = datasets.Dataset.from_dict({"cell_type": ["d", "a"]})
    label2id, messages = label_mapping(train, val, test, "cell_type")
    assert label2id == {"a": 0, "b": 1, "c": 2, "d": 3}
    assert messages == ["label 'c' occurs in val but not in train", "label 'd' occurs in test but not in train"]
