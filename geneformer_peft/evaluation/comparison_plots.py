"""Optional figure of the model against the linear baseline: per-class F1, side by side.

Same conventions as :mod:`geneformer_peft.evaluation.plots`: matplotlib is optional (without
it the function logs once and returns None), figures are drawn on an Agg canvas and saved
atomically.
"""
from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from geneformer_peft.evaluation import plots

__all__ = ["plot_per_class_f1"]

logger = logging.getLogger(__name__)


def plot_per_class_f1(
    model_per_class: Mapping[str, Mapping[str, Any]],
    baseline_per_class: Mapping[str, Mapping[str, Any]],
    path: str | os.PathLike,
    *,
    label_names: Sequence[str] | None = None,
    model_name: str = "model",
    baseline_name: str = "logistic regression",
    title: str | None = None,
    dpi: int = 150,
) -> Path | None:
    """Grouped bars of per-class F1: the model next to the baseline, one group per class.

    Parameters
    ----------
    model_per_class, baseline_per_class : mapping
        ``metrics["per_class"]`` of the model and of the baseline (label name ->
        ``{"f1": float, "support": int, ...}``).
    path : path-like
        Output file; the format follows the extension.
    label_names : sequence of str, optional
        Classes in display order (default: the model's order).
    model_name, baseline_name : str
        Legend entries.
    title : str, optional
        Figure title.
    dpi : int, default 150
        Resolution of raster output.

    Returns
    -------
    pathlib.Path or None
        ``path``, or None when matplotlib is missing.

    Raises
    ------
    ValueError
        If a class lacks an ``f1`` entry on either side.
    """
    names = [str(n) for n in (label_names if label_names is not None else model_per_class)]
    for side, per_class in (("model", model_per_class), ("baseline", baseline_per_class)):
        missing = [n for n in names if n not in per_class or "f1" not in per_class[n]]
        if missing:
            raise ValueError(f"{side} per-class metrics lack an 'f1' for classes {missing}")
    if not plots.plotting_available():
        plots._log_missing_once()
        return None
    model_f1 = np.array([float(model_per_class[n]["f1"]) for n in names])
    base_f1 = np.array([float(baseline_per_class[n]["f1"]) for n in names])
    support = [model_per_class[n].get("support") for n in names]

    width = min(max(6.0, 0.6 * len(names) + 3.0), 20.0)
    figure = plots._new_figure(width, 4.5)
    axes = figure.add_subplot()
    x = np.arange(len(names))
    axes.bar(x - 0.2, model_f1, 0.4, label=f"{model_name} (macro {model_f1.mean():.3f})", color="tab:blue")
    axes.bar(x + 0.2, base_f1, 0.4, label=f"{baseline_name} (macro {base_f1.mean():.3f})", color="tab:gray")
    ticks = [f"{n}\n(n={s})" if s is not None else n for n, s in zip(names, support)]
    axes.set_xticks(x, labels=ticks, rotation=30 if len(names) > 6 else 0, ha="right" if len(names) > 6 else "center")
    axes.set_ylim(0.0, 1.05)
    axes.set_ylabel("F1 on the test split")
    axes.legend(loc="lower right")
    axes.grid(axis="y", alpha=0.3)
    axes.set_title(title or f"per-class F1: {model_name} vs {baseline_name}")
    return plots._save_atomically(figure, path, dpi=dpi)
