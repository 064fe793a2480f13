"""Figures of the analyses: UMAP of cell embeddings, heatmap of per-label mean embeddings,
volcano plot of a perturbation scan.

matplotlib (extra ``plot``) and umap-learn (extra ``umap``) are optional. Without
matplotlib every function logs once and returns None; without umap-learn the UMAP is
skipped with a warning that says what to install. Figures are drawn on an Agg canvas
(no pyplot state) and written atomically, as in :mod:`geneformer_peft.evaluation.plots`.
"""
from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from geneformer_peft.evaluation.plots import _log_missing_once, _new_figure, _save_atomically, plotting_available

__all__ = ["UMAP_MISSING", "plot_label_heatmap", "plot_umap", "plot_volcano", "umap_available", "umap_coordinates"]

logger = logging.getLogger(__name__)

UMAP_MISSING = ("umap-learn is not installed, so the UMAP plot is skipped; install it with "
                "`pip install umap-learn` (or `pip install geneformer-peft[umap]`)")
_MAX_LEGEND = 30


def umap_available() -> bool:
    """Whether ``umap`` (umap-learn) can be imported."""
    try:
        import umap  # noqa: F401
    except ImportError:
        return False
    return True


def umap_coordinates(embeddings: np.ndarray, *, seed: int = 0, n_neighbors: int = 15) -> np.ndarray | None:
    """(n, 2) UMAP coordinates of ``embeddings``, or None (with a warning) without umap-learn."""
    try:
        import umap
    except ImportError:
        logger.warning(UMAP_MISSING)
        return None
    n = len(embeddings)
    reducer = umap.UMAP(n_neighbors=max(2, min(n_neighbors, n - 1)), random_state=seed, n_components=2)
    return np.asarray(reducer.fit_transform(np.asarray(embeddings, dtype=np.float32)))


def _categories(labels) -> tuple[list[str], np.ndarray]:
    values = pd.Series(np.asarray(labels)).astype(str)
    counts = values.value_counts()
    names = list(counts.index)  # largest class first, so it is drawn first (underneath)
    codes = values.map({n: i for i, n in enumerate(names)}).to_numpy()
    return names, codes


def plot_umap(coordinates: np.ndarray, labels, path: str | os.PathLike, *, label_name: str, title: str,
              dpi: int = 150) -> Path | None:
    """Scatter plot of 2-D ``coordinates`` coloured by ``labels``, legend with class names.

    Returns
    -------
    pathlib.Path or None
        ``path``, or None without matplotlib.
    """
    if not plotting_available():
        _log_missing_once()
        return None
    coordinates = np.asarray(coordinates)
    names, codes = _categories(labels)
    from matplotlib import colormaps

    cmap = colormaps["tab20" if len(names) > 10 else "tab10"]
    figure = _new_figure(8.5 if len(names) > 8 else 7.5, 6.0)
    axes = figure.add_subplot()
    size = float(np.clip(3000.0 / max(len(codes), 1), 2.0, 30.0))
    for i, name in enumerate(names):
        picked = codes == i
        axes.scatter(coordinates[picked, 0], coordinates[picked, 1], s=size, color=cmap(i % cmap.N),
                     label=f"{name} ({int(picked.sum())})", alpha=0.8, linewidths=0)
    axes.set_xlabel("UMAP 1")
    axes.set_ylabel("UMAP 2")
    axes.set_xticks([])
    axes.set_yticks([])
    axes.set_title(title)
    if len(names) <= _MAX_LEGEND:
        axes.legend(title=label_name, loc="center left", bbox_to_anchor=(1.01, 0.5), markerscale=max(1.0, 30 / size),
                    fontsize="small", frameon=False)
    return _save_atomically(figure, path, dpi=dpi)


def plot_label_heatmap(embeddings: np.ndarray, labels, path: str | os.PathLike, *, label_name: str, title: str,
                       dpi: int = 150) -> Path | None:
    """Heatmap of the mean embedding of each label (rows) over the embedding dimensions
    (columns), each dimension centred and scaled across labels (z-score) so that the
    differences between labels show.

    Returns
    -------
    pathlib.Path or None
        ``path``, or None without matplotlib.
    """
    if not plotting_available():
        _log_missing_once()
        return None
    names, codes = _categories(labels)
    names_sorted = sorted(names)
    order = [names.index(n) for n in names_sorted]
    emb = np.asarray(embeddings, dtype=np.float64)
    means = np.stack([emb[codes == i].mean(axis=0) for i in order])
    spread = means.std(axis=0)
    z = (means - means.mean(axis=0)) / np.where(spread > 0, spread, 1.0)
    limit = float(np.nanmax(np.abs(z))) if z.size else 1.0
    height = float(np.clip(0.35 * len(names) + 2.0, 3.0, 14.0))
    figure = _new_figure(float(np.clip(0.04 * emb.shape[1] + 5.0, 7.0, 18.0)), height)
    axes = figure.add_subplot()
    image = axes.imshow(z, aspect="auto", cmap="RdBu_r", vmin=-limit, vmax=limit, interpolation="nearest")
    figure.colorbar(image, ax=axes, fraction=0.03, pad=0.02, label="mean embedding (z-score across labels)")
    axes.set_yticks(range(len(names_sorted)),
                    labels=[f"{n} ({int((codes == i).sum())})" for n, i in zip(names_sorted, order)])
    axes.set_xlabel("embedding dimension")
    axes.set_ylabel(label_name)
    axes.set_title(title)
    return _save_atomically(figure, path, dpi=dpi)


def plot_volcano(stats: pd.DataFrame, path: str | os.PathLike, *, effect_column: str, title: str,
                 effect_label: str, fdr_threshold: float = 0.05, n_labels: int = 10, dpi: int = 150) -> Path | None:
    """Volcano-style plot of a ranked perturbation table: effect vs -log10(p), genes with
    FDR below ``fdr_threshold`` highlighted and the ``n_labels`` strongest named.

    ``stats`` needs the columns ``gene``, ``effect_column``, ``p_value`` and ``fdr``.

    Returns
    -------
    pathlib.Path or None
        ``path``, or None without matplotlib (or without any tested gene).
    """
    if not plotting_available():
        _log_missing_once()
        return None
    tested = stats.dropna(subset=["p_value", effect_column])
    if tested.empty:
        logger.info("no gene was tested; the volcano plot is skipped")
        return None
    effect = tested[effect_column].to_numpy(dtype=np.float64)
    neglog = -np.log10(np.clip(tested["p_value"].to_numpy(dtype=np.float64), 1e-300, 1.0))
    significant = tested["fdr"].to_numpy(dtype=np.float64) < fdr_threshold
    figure = _new_figure(7.5, 6.0)
    axes = figure.add_subplot()
    axes.scatter(effect[~significant], neglog[~significant], s=10, color="0.6", linewidths=0,
                 label=f"FDR >= {fdr_threshold:g} ({int((~significant).sum())})")
    axes.scatter(effect[significant], neglog[significant], s=14, color="tab:red", linewidths=0,
                 label=f"FDR < {fdr_threshold:g} ({int(significant.sum())})")
    axes.axvline(0.0, color="0.3", linewidth=0.8)
    strongest = np.argsort(-(neglog + np.abs(effect) / (np.abs(effect).max() or 1.0)))[:n_labels]
    genes: Sequence[str] = tested["gene"].astype(str).tolist()
    for i in strongest:
        axes.annotate(genes[i], (effect[i], neglog[i]), fontsize=7, xytext=(3, 3), textcoords="offset points")
    axes.set_xlabel(effect_label)
    axes.set_ylabel("-log10 p-value (vs random-gene null)")
    axes.set_title(title)
    axes.legend(loc="upper left", fontsize="small")
    axes.grid(alpha=0.3)
    return _save_atomically(figure, path, dpi=dpi)
