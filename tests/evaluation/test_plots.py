"""Tests for geneformer_peft.evaluation.plots."""
from __future__ import annotations

import logging

import numpy as np
import pytest

from geneformer_peft.evaluation import plots

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def confusion(n_classes, seed=0):
    rng = np.random.default_rng(seed)
    cm = rng.integers(0, 5, size=(n_classes, n_classes))
    cm[np.diag_indices(n_classes)] += rng.integers(20, 80, size=n_classes)
    return cm


def history():
    return [
        {"epoch": e, "train_loss": 1.6 / e, "val_loss": 1.4 / e + 0.02 * e, "val_macro_f1": 0.9 - 0.5 / e}
        for e in range(1, 7)
    ]


@pytest.mark.parametrize("n_classes", [5, 20])
@pytest.mark.parametrize("normalize", [True, False])
def test_confusion_matrix_png(tmp_path, n_classes, normalize):
    pytest.importorskip("matplotlib")
    names = [f"cell type {k}" for k in range(n_classes)]
    cm = confusion(n_classes)
    cm[-1] = 0  # a class absent from the split
    path = plots.plot_confusion_matrix(cm, names, tmp_path / "figs" / "cm.png", normalize=normalize,
                                       title="fold 0")
    assert path == tmp_path / "figs" / "cm.png"
    assert path.read_bytes()[:8] == PNG_MAGIC
    assert [p.name for p in path.parent.iterdir()] == ["cm.png"]  # no temporary file left


def test_training_curves_png_and_other_formats(tmp_path):
    pytest.importorskip("matplotlib")
    path = plots.plot_training_curves(history(), tmp_path / "curves.png", title="fold 0")
    assert path.read_bytes()[:8] == PNG_MAGIC
    records = history()
    records[0]["val_loss"] = None  # missing values are skipped
    records[1]["val_macro_f1"] = float("nan")
    svg = plots.plot_training_curves(records, tmp_path / "curves.svg")
    assert b"<svg" in svg.read_bytes()[:1000]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["curves.png", "curves.svg"]


def test_plot_input_validation(tmp_path):
    with pytest.raises(ValueError, match=r"square matrix, got shape \(2, 3\)"):
        plots.plot_confusion_matrix(np.ones((2, 3)), ["a", "b"], tmp_path / "cm.png")
    with pytest.raises(ValueError, match="cm has 2 classes but label_names has 3"):
        plots.plot_confusion_matrix(np.ones((2, 2)), ["a", "b", "c"], tmp_path / "cm.png")
    with pytest.raises(ValueError, match="history is empty"):
        plots.plot_training_curves([], tmp_path / "c.png")
    with pytest.raises(ValueError, match=r"history\[0\] has no 'epoch'"):
        plots.plot_training_curves([{"train_loss": 1.0}], tmp_path / "c.png")
    if plots.plotting_available():
        with pytest.raises(ValueError, match="no extension"):
            plots.plot_confusion_matrix(np.eye(2), ["a", "b"], tmp_path / "cm")
    assert list(tmp_path.iterdir()) == []


def test_without_matplotlib_returns_none_and_logs_once(tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(plots, "plotting_available", lambda: False)
    monkeypatch.setattr(plots, "_missing_logged", False)
    with caplog.at_level(logging.INFO, logger="geneformer_peft.evaluation.plots"):
        assert plots.plot_confusion_matrix(np.eye(2), ["a", "b"], tmp_path / "cm.png") is None
        assert plots.plot_training_curves(history(), tmp_path / "c.png") is None
    assert sum("matplotlib is not installed" in r.getMessage() for r in caplog.records) == 1
    assert list(tmp_path.iterdir()) == []


def test_the_star_marks_the_restored_epoch():
    """Tied best macro-F1 at epochs 5 and 6: the trainer keeps the one with the lower
    validation loss (6, as metrics.json's best_epoch says), and so does the plot."""
    from geneformer_peft.evaluation.plots import starred_epoch

    history = [{"epoch": e, "val_macro_f1": f, "val_loss": loss}
               for e, f, loss in [(4, 0.7, 0.9), (5, 0.8, 0.6), (6, 0.8, 0.5), (7, 0.75, 0.4)]]
    assert starred_epoch(history, best_epoch=6) == 6
    assert starred_epoch(history) == 6  # without best_epoch: the trainer's rule
    assert starred_epoch([{**h, "val_loss": 0.5} for h in history]) == 5  # full tie: the earlier epoch
    assert starred_epoch(history, best_epoch=99) == 6  # an epoch not in the history falls back
    assert starred_epoch([{"epoch": 1, "train_loss": 1.0}]) is None
