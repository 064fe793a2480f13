"""Tests for geneformer_peft.evaluation.metrics and geneformer_peft.evaluation.outputs."""
from __future__ import annotations

import json
import math
import os
import pickle

import numpy as np
import pandas as pd
import pytest

from geneformer_peft.evaluation import outputs
from geneformer_peft.evaluation.metrics import SCALAR_METRICS, classification_metrics, macro_f1
from geneformer_peft.evaluation.outputs import (
    FOLD_DONE_MARKER,
    atomic_directory,
    format_summary_table,
    is_fold_done,
    mark_fold_done,
    summarize_folds,
    write_json,
    write_pickle,
    write_predictions_csv,
    write_summary,
    write_text,
)

# Four labels; "d" never occurs in y_true but is predicted once.
LABELS = ["a", "b", "c", "d"]
Y_TRUE = [0, 0, 0, 1, 1, 2]
Y_PRED = [0, 0, 1, 1, 3, 2]


def leftovers(folder):
    """Entries in ``folder`` that look like temporary files or folders."""
    return [p.name for p in folder.iterdir() if ".tmp" in p.name or ".old-" in p.name]


# ----------------------------------------------------------------------------- metrics


def test_metrics_match_hand_computed_example():
    m = classification_metrics(Y_TRUE, Y_PRED, label_names=LABELS)
    # Per class (precision, recall, f1): a (1, 2/3, 0.8), b (1/2, 1/2, 1/2), c (1, 1, 1), d (0, 0, 0).
    assert m["accuracy"] == pytest.approx(4 / 6)
    assert m["balanced_accuracy"] == pytest.approx((2 / 3 + 1 / 2 + 1) / 3)  # classes in y_true only
    assert m["macro_precision"] == pytest.approx((1 + 0.5 + 1 + 0) / 4)
    assert m["macro_recall"] == pytest.approx((2 / 3 + 0.5 + 1 + 0) / 4)
    assert m["macro_f1"] == pytest.approx((0.8 + 0.5 + 1 + 0) / 4)
    for key in ("micro_precision", "micro_recall", "micro_f1"):
        assert m[key] == pytest.approx(4 / 6)
    assert m["weighted_f1"] == pytest.approx((3 * 0.8 + 2 * 0.5 + 1 * 1) / 6)
    assert m["per_class"]["a"] == pytest.approx({"precision": 1.0, "recall": 2 / 3, "f1": 0.8, "support": 3})
    assert m["per_class"]["d"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 0}
    assert m["confusion_matrix"] == [[2, 1, 0, 0], [0, 1, 0, 1], [0, 0, 1, 0], [0, 0, 0, 0]]
    assert m["labels"] == LABELS
    assert m["n_cells"] == 6
    assert set(SCALAR_METRICS) <= set(m)


def test_metrics_are_plain_json():
    probs = np.full((6, 4), 0.1)
    probs[np.arange(6), Y_PRED] = 0.7
    m = classification_metrics(np.array(Y_TRUE), np.array(Y_PRED), label_names=LABELS, probabilities=probs)
    assert m["mean_confidence"] == pytest.approx(0.7)
    assert json.loads(json.dumps(m)) == m  # plain Python types only
    assert type(m["accuracy"]) is float and type(m["n_cells"]) is int
    assert type(m["confusion_matrix"][0][0]) is int


def test_label_absent_from_both_truth_and_predictions_still_reported():
    m = classification_metrics([0, 1], [0, 1], label_names=["x", "y", "z"])
    assert m["confusion_matrix"] == [[1, 0, 0], [0, 1, 0], [0, 0, 0]]
    assert m["per_class"]["z"]["support"] == 0
    assert m["balanced_accuracy"] == 1.0
    assert m["accuracy"] == 1.0


def test_macro_f1_helper():
    assert macro_f1(Y_TRUE, Y_PRED, 4) == pytest.approx(0.575)
    assert macro_f1(np.array([1, 1]), np.array([1, 1]), 2) == pytest.approx(0.5)  # class 0 counts as 0
    assert macro_f1([], [], 3) == 0.0


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(y_true=[0, 1], y_pred=[0]), "differ in length"),
        (dict(y_true=[0, 4], y_pred=[0, 1]), r"\[0, 4\].*\[0, 3\]"),
        (dict(y_true=[0, -1], y_pred=[0, 1]), "expected ids in"),
        (dict(y_true=[0.5, 1], y_pred=[0, 1]), "integer label ids"),
        (dict(y_true=[], y_pred=[]), "empty"),
        (dict(y_true=[0, 1], y_pred=[0, 1], probabilities=np.ones((2, 3))), r"\(2, 3\).*\(2, 4\)"),
    ],
)
def test_metrics_reject_bad_input(kwargs, match):
    with pytest.raises(ValueError, match=match):
        classification_metrics(label_names=LABELS, **kwargs)


# ----------------------------------------------------------------------------- predictions csv


def test_predictions_csv_columns_and_values(tmp_path):
    probs = np.array([[0.7, 0.2, 0.1], [0.1, 0.3, 0.6], [0.25, 0.5, 0.25]])
    path = write_predictions_csv(
        tmp_path / "predictions.csv",
        cell_index=[10, 11, 12],
        label_names=["B cell", "T cell", "NK cell"],
        pred_ids=probs.argmax(axis=1),
        probabilities=probs,
        true_ids=np.array([0, 1, 1]),
    )
    frame = pd.read_csv(path)
    assert list(frame.columns) == [
        "index", "gt_celltype", "pred_celltype", "gt_cellcode", "pred_cellcode", "confidence",
        "prob_B cell", "prob_T cell", "prob_NK cell",
    ]
    assert frame["index"].tolist() == [10, 11, 12]
    assert frame["gt_celltype"].tolist() == ["B cell", "T cell", "T cell"]
    assert frame["pred_celltype"].tolist() == ["B cell", "NK cell", "T cell"]
    assert frame["gt_cellcode"].tolist() == [0, 1, 1]
    assert frame["pred_cellcode"].tolist() == [0, 2, 1]
    np.testing.assert_allclose(frame["confidence"], [0.7, 0.6, 0.5])
    np.testing.assert_allclose(frame[["prob_B cell", "prob_T cell", "prob_NK cell"]].to_numpy(), probs)
    assert leftovers(tmp_path) == []


def test_predictions_csv_without_ground_truth(tmp_path):
    path = write_predictions_csv(
        tmp_path / "p.csv", cell_index=["c1"], label_names=["x", "y"],
        pred_ids=[1], probabilities=np.array([[0.4, 0.6]]),
    )
    frame = pd.read_csv(path)
    assert list(frame.columns) == ["index", "pred_celltype", "pred_cellcode", "confidence", "prob_x", "prob_y"]


def test_predictions_csv_rejects_mismatched_shapes(tmp_path):
    with pytest.raises(ValueError, match=r"probabilities has shape \(2, 3\); expected \(2, 2\)"):
        write_predictions_csv(tmp_path / "p.csv", cell_index=[0, 1], label_names=["x", "y"],
                              pred_ids=[0, 1], probabilities=np.ones((2, 3)))
    with pytest.raises(ValueError, match="pred_ids must be integer label ids"):
        write_predictions_csv(tmp_path / "p.csv", cell_index=[0, 1], label_names=["x", "y"],
                              pred_ids=[0, 2], probabilities=np.ones((2, 2)))
    assert not (tmp_path / "p.csv").exists()


# ----------------------------------------------------------------------------- atomic files


def test_atomic_writers_round_trip_and_leave_no_temp_file(tmp_path):
    write_json(tmp_path / "sub" / "m.json", {"a": np.float32(0.5), "b": np.arange(3), "c": np.int64(2)})
    assert json.loads((tmp_path / "sub" / "m.json").read_text()) == {"a": 0.5, "b": [0, 1, 2], "c": 2}
    write_pickle(tmp_path / "p.pickle", {"logits": np.eye(2)})
    with open(tmp_path / "p.pickle", "rb") as handle:
        np.testing.assert_array_equal(pickle.load(handle)["logits"], np.eye(2))
    write_text(tmp_path / "t.txt", "hello\n")
    assert (tmp_path / "t.txt").read_text() == "hello\n"
    assert leftovers(tmp_path) == [] and leftovers(tmp_path / "sub") == []


def test_failed_serialisation_does_not_clobber_old_file(tmp_path):
    path = write_json(tmp_path / "m.json", {"old": 1})
    with pytest.raises(TypeError):
        write_json(path, {"new": object()})
    with pytest.raises(Exception):
        write_pickle(tmp_path / "m.json", lambda: None)
    assert json.loads(path.read_text()) == {"old": 1}
    assert leftovers(tmp_path) == []


def test_failure_while_moving_into_place_keeps_old_file(tmp_path, monkeypatch):
    path = write_text(tmp_path / "out.txt", "old")

    def failing_replace(src, dst):
        raise OSError("disk full (simulated)")

    monkeypatch.setattr(outputs.os, "replace", failing_replace)
    with pytest.raises(OSError, match="simulated"):
        write_text(path, "new")
    with pytest.raises(OSError, match="simulated"):
        write_predictions_csv(path, cell_index=[0], label_names=["x"], pred_ids=[0],
                              probabilities=np.ones((1, 1)))
    monkeypatch.undo()
    assert path.read_text() == "old"
    assert leftovers(tmp_path) == []


def test_atomic_directory_success_failure_and_overwrite(tmp_path):
    final = tmp_path / "model"
    with atomic_directory(final) as tmp_dir:
        assert tmp_dir != final and tmp_dir.parent == tmp_path and ".tmp-" in tmp_dir.name
        (tmp_dir / "config.json").write_text("{}")
        assert not final.exists()
    assert (final / "config.json").read_text() == "{}"

    with pytest.raises(FileExistsError, match="overwrite=True"):
        with atomic_directory(final):
            pass

    with pytest.raises(RuntimeError, match="boom"):
        with atomic_directory(final, overwrite=True) as tmp_dir:
            (tmp_dir / "config.json").write_text('{"half": true}')
            raise RuntimeError("boom")
    assert (final / "config.json").read_text() == "{}"  # old folder untouched

    with atomic_directory(final, overwrite=True) as tmp_dir:
        (tmp_dir / "weights.bin").write_bytes(b"\x00")
    assert sorted(p.name for p in final.iterdir()) == ["weights.bin"]

    with pytest.raises(ValueError):
        with atomic_directory(tmp_path / "never"):
            raise ValueError("fails before rename")
    assert not (tmp_path / "never").exists()
    assert leftovers(tmp_path) == []


def test_fold_done_marker(tmp_path):
    fold = tmp_path / "0"
    assert not is_fold_done(fold)  # folder missing
    fold.mkdir()
    write_json(fold / "metrics.json", {"accuracy": 1.0})
    assert not is_fold_done(fold)  # interrupted before the marker
    marker = mark_fold_done(fold, info={"macro_f1": 0.9})
    assert marker.name == FOLD_DONE_MARKER
    assert is_fold_done(fold)
    record = json.loads(marker.read_text())
    assert record["files"] == ["metrics.json"] and record["info"] == {"macro_f1": 0.9}

    (fold / "metrics.json").unlink()
    assert not is_fold_done(fold)  # a listed output went missing
    marker.write_text("{not json")
    assert not is_fold_done(fold)
    with pytest.raises(ValueError, match="not an existing folder"):
        mark_fold_done(tmp_path / "missing")


# ----------------------------------------------------------------------------- summary


def fold_metrics():
    rows = []
    for accuracy, f1 in [(0.8, 0.7), (0.9, 0.75), (0.85, 0.95)]:
        rows.append({
            "accuracy": accuracy,
            "macro_f1": f1,
            "n_cells": 100,
            "train_time_s": 1234.5,
            "per_class": {"a": {"f1": 1.0}},
            "confusion_matrix": [[1]],
            "labels": ["a"],
        })
    return rows


def test_summarize_folds_mean_and_sample_std():
    summary = summarize_folds(fold_metrics(), [0, 1, 2])
    assert summary["folds"] == ["fold_0", "fold_1", "fold_2"] and summary["n_folds"] == 3
    assert list(summary["metrics"]) == ["accuracy", "macro_f1", "n_cells", "train_time_s"]
    acc = summary["metrics"]["accuracy"]
    assert acc["mean"] == pytest.approx(0.85)
    assert acc["std"] == pytest.approx(0.05)  # sqrt(((-.05)^2 + .05^2 + 0) / (3 - 1))
    assert acc["values"] == {"fold_0": 0.8, "fold_1": 0.9, "fold_2": 0.85}
    f1 = summary["metrics"]["macro_f1"]
    assert f1["std"] == pytest.approx(np.std([0.7, 0.75, 0.95], ddof=1))
    assert summary["metrics"]["n_cells"]["std"] == 0.0
    json.dumps(summary)


def test_summarize_single_fold_and_missing_metric():
    single = summarize_folds([{"accuracy": 0.5}], [3])
    assert single["metrics"]["accuracy"] == {"mean": 0.5, "std": 0.0, "n": 1, "values": {"fold_3": 0.5}}
    partial = summarize_folds([{"accuracy": 0.5, "extra": 2.0}, {"accuracy": 0.7, "extra": float("nan")}], [0, 1])
    assert partial["metrics"]["extra"] == {"mean": 2.0, "std": 0.0, "n": 1,
                                           "values": {"fold_0": 2.0, "fold_1": None}}
    with pytest.raises(ValueError, match="2 fold metrics but 1 fold ids"):
        summarize_folds([{}, {}], [0])


def test_write_summary_and_table(tmp_path):
    summary = summarize_folds(fold_metrics(), [0, 1, 2])
    json_path, csv_path = write_summary(tmp_path, summary)
    assert json.loads(json_path.read_text()) == summary
    frame = pd.read_csv(csv_path)
    assert list(frame.columns) == ["metric", "fold_0", "fold_1", "fold_2", "mean", "std"]
    assert frame["metric"].tolist() == ["accuracy", "macro_f1", "n_cells", "train_time_s"]
    row = frame.set_index("metric").loc["accuracy"]
    assert row["fold_1"] == pytest.approx(0.9) and row["mean"] == pytest.approx(0.85)
    assert row["std"] == pytest.approx(0.05)

    table = format_summary_table(summary)
    lines = table.splitlines()
    assert "3 folds" in lines[0]
    for name in summary["metrics"]:
        assert any(line.startswith(name) for line in lines)
    assert "0.8500 ± 0.0500" in table
    # a constant (equal on every fold) is shown without a spread
    assert "1234.5" in table and "1234.5 ±" not in table and "± 0.0000" not in table
    # Aligned: every "±" sits in the same column.
    columns = {line.index("±") for line in lines if "±" in line}
    assert len(columns) == 1
    assert leftovers(tmp_path) == []
    assert math.isfinite(row["std"])
    assert os.path.basename(json_path) == "summary.json"


def test_single_fold_table_has_no_spread():
    summary = summarize_folds(fold_metrics()[:1], [3])
    table = format_summary_table(summary)
    assert "1 fold)" in table.splitlines()[0]
    assert "±" not in table and "std" not in table
    assert "0.8000" in table and "0.7000" in table
