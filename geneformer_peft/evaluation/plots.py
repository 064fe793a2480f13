"""Optional figures: confusion matrix and training curves.

matplotlib is an optional dependency (``pip install geneformer-peft[plot]``). It is
imported inside the functions; without it every plotting function logs once (at info
level) and returns None, so a run never fails for want of a figure. Figures are drawn on
the Agg canvas without touching pyplot's global state, and files are written atomically
(saved under a temporary name with the same extension, then moved into place).
"""
from __future__ import annotations

import logging
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from geneformer_peft.files import atomic_file

__all__ = ["new_figure", "plotting_available", "plot_confusion_matrix", "plot_training_curves", "starred_epoch"]

logger = logging.getLogger(__name__)

_missing_logged = False


def plotting_available() -> bool:
    """Whether matplotlib can be imported.

    Returns
    -------
    bool
        True when figures can be drawn.
    """
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def _log_missing_once() -> None:
    global _missing_logged
    if not _missing_logged:
        logger.info("matplotlib is not installed; figures are skipped (pip install matplotlib)")
        _missing_logged = True


def new_figure(width: float, height: float) -> Any:
    """A matplotlib Figure on an Agg canvas (see :func:`_new_figure`), or None without matplotlib."""
    if not plotting_available():
        _log_missing_once()
        return None
    return _new_figure(width, height)


def _new_figure(width: float, height: float) -> Any:
    """A matplotlib Figure attached to an Agg canvas (no pyplot, no global backend)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def _save_atomically(figure: Any, path: str | os.PathLike | None, *, dpi: int) -> Any:
    """Save ``figure`` to a temporary file beside ``path``, then move it into place; with no
    ``path``, return the figure itself (the Python API shows it)."""
    if path is None:
        return figure
    path = Path(path)
    suffix = path.suffix.lower()
    if not suffix:
        raise ValueError(f"path {path} has no extension; expected e.g. '.png', '.pdf' or '.svg'")
    supported = figure.canvas.get_supported_filetypes()
    if suffix[1:] not in supported:
        raise ValueError(f"cannot save a figure as {suffix!r}; expected one of {sorted(supported)}")
    with atomic_file(path, suffix=path.suffix) as tmp_name:
        figure.savefig(tmp_name, format=suffix[1:], dpi=dpi)
    return path


def plot_confusion_matrix(
    cm: Sequence[Sequence[float]] | np.ndarray,
    label_names: Sequence[str],
    path: str | os.PathLike | None,
    *,
    normalize: bool = True,
    title: str = "Confusion matrix",
    dpi: int = 150,
) -> Path | None:
    """Draw an annotated confusion matrix (rows = true label, columns = predicted).

    Parameters
    ----------
    cm : array-like, shape (n_classes, n_classes)
        Counts, rows = true, columns = predicted, in label-id order (as in
        ``classification_metrics(...)["confusion_matrix"]``).
    label_names : sequence of str
        Name of each label id.
    path : path-like or None
        Output file; the format follows the extension (``.png``, ``.pdf``, ``.svg``). None:
        return the matplotlib Figure instead of saving it.
    normalize : bool, default True
        Show each row as fractions of that true class (recall on the diagonal); a row
        without cells stays 0. Raw counts otherwise.
    title : str, default "Confusion matrix"
        Figure title.
    dpi : int, default 150
        Resolution of raster output.

    Returns
    -------
    pathlib.Path, matplotlib Figure or None
        ``path`` (the Figure when ``path`` is None), or None when matplotlib is missing.

    Raises
    ------
    ValueError
        If ``cm`` is not square or does not match ``label_names``.
    """
    matrix = np.asarray(cm, dtype=np.float64)
    names = [str(name) for name in label_names]
    if matrix.ndim != 2 or matrix.shape[0] != matrix.shape[1]:
        raise ValueError(f"cm must be a square matrix, got shape {matrix.shape}")
    if matrix.shape[0] != len(names):
        raise ValueError(
            f"cm has {matrix.shape[0]} classes but label_names has {len(names)}; expected equal"
        )
    if not plotting_available():
        _log_missing_once()
        return None

    n_classes = len(names)
    counts = matrix
    if normalize:
        row_sums = matrix.sum(axis=1, keepdims=True)
        shown = np.divide(matrix, row_sums, out=np.zeros_like(matrix), where=row_sums > 0)
    else:
        shown = matrix

    side = min(max(5.0, 0.55 * n_classes + 3.0), 16.0)
    figure = _new_figure(side + 1.0, side)
    axes = figure.add_subplot()
    vmax = 1.0 if normalize else max(float(shown.max()), 1.0)
    image = axes.imshow(shown, cmap="Blues", vmin=0.0, vmax=vmax, interpolation="nearest")
    figure.colorbar(image, ax=axes, fraction=0.046, pad=0.04,
                    label="fraction of true class" if normalize else "cells")

    axes.set_xticks(range(n_classes), labels=names, rotation=45, ha="right", rotation_mode="anchor")
    axes.set_yticks(range(n_classes), labels=names)
    axes.set_xlabel("predicted")
    axes.set_ylabel("true")
    axes.set_title(title)

    font_size = float(np.clip(13.0 - 0.3 * n_classes, 6.5, 11.0))
    threshold = 0.5 * vmax
    for i in range(n_classes):
        for j in range(n_classes):
            value = shown[i, j]
            if n_classes > 12 and counts[i, j] == 0:
                continue  # keep large matrices readable: empty cells stay blank
            if normalize:
                text = f"{value:.2f}"
                if n_classes <= 12:
                    text += f"\n({int(round(counts[i, j]))})"
            else:
                text = f"{int(round(value))}" if float(value).is_integer() else f"{value:.2g}"
            axes.text(j, i, text, ha="center", va="center", fontsize=font_size,
                      color="white" if value > threshold else "black")
    return _save_atomically(figure, path, dpi=dpi)


def _series(history: Sequence[Mapping[str, Any]], key: str) -> tuple[list[float], list[float]]:
    """Epochs and finite values of ``key`` over the history (missing or NaN skipped)."""
    epochs, values = [], []
    for record in history:
        value = record.get(key)
        if value is None:
            continue
        value = float(value)
        if math.isfinite(value):
            epochs.append(float(record["epoch"]))
            values.append(value)
    return epochs, values


def starred_epoch(history: Sequence[Mapping[str, Any]], best_epoch: int | None = None) -> float | None:
    """The epoch the training-curve plot stars: ``best_epoch`` when it has a finite
    validation macro-F1, else the trainer's choice (highest macro-F1; among ties the lower
    validation loss, then the earlier epoch)."""
    epochs, values = _series(history, "val_macro_f1")
    if not values:
        return None
    if best_epoch is not None and float(best_epoch) in epochs:
        return float(best_epoch)
    losses = {float(r["epoch"]): float(r["val_loss"]) if r.get("val_loss") is not None else math.inf
              for r in history}
    top = max(values)
    tied = [e for e, v in zip(epochs, values) if v == top]
    return min(tied, key=lambda e: (losses.get(e, math.inf), e))


def plot_training_curves(
    history: Sequence[Mapping[str, Any]],
    path: str | os.PathLike | None,
    *,
    title: str | None = None,
    dpi: int = 150,
    best_epoch: int | None = None,
) -> Path | None:
    """Draw losses (left) and validation macro-F1 (right) per epoch.

    Parameters
    ----------
    history : sequence of mapping
        One dict per epoch with ``epoch`` and any of ``train_loss``, ``val_loss``,
        ``val_macro_f1`` (a missing or NaN value is skipped).
    path : path-like or None
        Output file; the format follows the extension. None: return the Figure instead.
    title : str, optional
        Figure title.
    dpi : int, default 150
        Resolution of raster output.
    best_epoch : int, optional
        The epoch whose weights were kept (``metrics.json`` ``best_epoch``); it gets the star.
        Default: :func:`starred_epoch`'s choice (highest macro-F1, a tie to the lower
        validation loss, as the trainer selects).

    Returns
    -------
    pathlib.Path, matplotlib Figure or None
        ``path`` (the Figure when ``path`` is None), or None when matplotlib is missing.

    Raises
    ------
    ValueError
        If ``history`` is empty or a record lacks ``epoch``.
    """
    history = list(history)
    if not history:
        raise ValueError("history is empty; expected one dict per epoch")
    for position, record in enumerate(history):
        if "epoch" not in record:
            raise ValueError(f"history[{position}] has no 'epoch' key; got keys {sorted(record)}")
    if not plotting_available():
        _log_missing_once()
        return None

    from matplotlib.ticker import MaxNLocator

    figure = _new_figure(10.0, 4.0)
    loss_axes, f1_axes = figure.subplots(1, 2)
    for key, label, style in (("train_loss", "train loss", "o-"), ("val_loss", "validation loss", "s--")):
        epochs, values = _series(history, key)
        if values:
            loss_axes.plot(epochs, values, style, label=label, markersize=4)
    loss_axes.set_xlabel("epoch")
    loss_axes.set_ylabel("cross-entropy loss")
    loss_axes.set_title("losses")
    if loss_axes.lines:
        loss_axes.legend()
    loss_axes.grid(alpha=0.3)

    epochs, values = _series(history, "val_macro_f1")
    if values:
        f1_axes.plot(epochs, values, "o-", color="tab:green", markersize=4, label="validation macro-F1")
        best = epochs.index(starred_epoch(history, best_epoch))
        f1_axes.plot([epochs[best]], [values[best]], "*", color="tab:red", markersize=12,
                     label=f"epoch kept: {epochs[best]:g} (val macro-F1 {values[best]:.3f})")
        f1_axes.legend(loc="lower right")
    f1_axes.set_xlabel("epoch")
    for axes in (loss_axes, f1_axes):  # whole epochs only
        axes.xaxis.set_major_locator(MaxNLocator(integer=True))
    f1_axes.set_ylabel("macro-F1")
    f1_axes.set_ylim(0.0, 1.02)
    f1_axes.set_title("validation macro-F1")
    f1_axes.grid(alpha=0.3)
    if title:
        figure.suptitle(title)
    return _save_atomically(figure, path, dpi=dpi)
