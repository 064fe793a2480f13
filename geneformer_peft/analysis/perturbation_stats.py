"""Statistics of a perturbation scan: per gene, its effect against a random-gene null.

For each perturbed gene (or combination) ``g`` with measure values ``x_g`` over the cells
where it was perturbed (``cosine_sim``, or ``shift_to_<goal>`` with cell states):

- the **null** of ``g`` is the pooled values of the random-gene perturbations of the same
  cells (their ``null_sample`` rows, :mod:`.perturbation`), leaving out ``g`` itself;
- ``effect = mean(x_g) - mean(null)``: for ``cosine_sim`` negative means ``g`` moves the
  cells more than random genes do; for ``shift_to_<goal>`` positive means more toward the goal;
- the two-sided Mann-Whitney U test of ``x_g`` against the null (``scipy.stats.mannwhitneyu``)
  gives ``p_value``; genes measured in fewer than ``min_cells`` cells are not tested;
- ``fdr``: Benjamini-Hochberg adjusted p-values over the tested genes
  (``scipy.stats.false_discovery_control``).

The ranked table lists tested genes by FDR, then p-value, then the size of the effect;
untested genes (too few cells, or expressed by none) follow.
"""
from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd

__all__ = ["benjamini_hochberg", "perturbation_statistics"]

logger = logging.getLogger(__name__)


def benjamini_hochberg(p_values) -> np.ndarray:
    """Benjamini-Hochberg adjusted p-values; NaN entries stay NaN and are not counted."""
    from scipy.stats import false_discovery_control

    p = np.asarray(p_values, dtype=np.float64)
    out = np.full(p.shape, np.nan)
    finite = np.isfinite(p)
    if finite.any():
        out[finite] = false_discovery_control(p[finite], method="bh")
    return out


def perturbation_statistics(results: pd.DataFrame, *, measure: str = "cosine_sim", min_cells: int = 3,
                            n_cells_absent: Mapping[str, int] | None = None,
                            listed: Sequence[str] | None = None) -> pd.DataFrame:
    """Ranked per-gene table of a scan's results (see the module docstring).

    Parameters
    ----------
    results : DataFrame
        Rows of :meth:`.perturbation.PerturbationScan.results` (columns ``cell``,
        ``perturbed``, ``is_null``, ``null_sample``, ``measure`` and optionally
        ``shift_to_*`` / ``prob_delta_*``).
    measure : str
        Column tested.
    min_cells : int
        Fewest cells for a test.
    n_cells_absent : mapping, optional
        Gene -> cells that do not express it (a column of the table).
    listed : sequence of str, optional
        Genes asked for: those never perturbed get a row too.

    Returns
    -------
    DataFrame
        ``rank``, ``gene``, ``n_cells``, [``n_cells_absent``], ``mean_<measure>``,
        ``null_mean``, ``n_null``, ``effect``, ``u_statistic``, ``p_value``, ``fdr``, then
        ``mean_<column>`` of the other measure columns.
    """
    from scipy.stats import mannwhitneyu

    if measure not in results.columns:
        raise ValueError(f"results have no column {measure!r}; columns: {list(results.columns)}")
    extra = [c for c in results.columns
             if c != measure and (c == "cosine_sim" or c.startswith(("shift_to_", "prob_delta_")))]
    tested = results[~results["is_null"].to_numpy(bool)]
    null = results[results["null_sample"].to_numpy(bool)].sort_values("cell", kind="stable")
    null_cells = null["cell"].to_numpy()
    null_keys = null["perturbed"].to_numpy()
    null_values = null[measure].to_numpy(np.float64)
    uniq, first, counts = np.unique(null_cells, return_index=True, return_counts=True)
    bounds = {int(c): (int(a), int(a + n)) for c, a, n in zip(uniq, first, counts)}
    rows = []
    for gene, group in tested.groupby("perturbed", sort=False):
        values = group[measure].to_numpy(np.float64)
        spans = [bounds[c] for c in group["cell"].to_numpy() if c in bounds]
        if spans:
            picked = np.concatenate([np.arange(a, b) for a, b in spans])
            picked = picked[null_keys[picked] != gene]
        else:
            picked = np.array([], dtype=np.int64)
        ref = null_values[picked]
        row = {"gene": gene, "n_cells": int(group["cell"].nunique()), f"mean_{measure}": float(values.mean()),
               f"std_{measure}": float(values.std(ddof=1)) if len(values) > 1 else np.nan,
               "null_mean": float(ref.mean()) if ref.size else np.nan, "n_null": int(ref.size)}
        row["effect"] = row[f"mean_{measure}"] - row["null_mean"] if ref.size else np.nan
        if len(values) >= min_cells and ref.size >= min_cells:
            res = mannwhitneyu(values, ref, alternative="two-sided")
            row["u_statistic"], row["p_value"] = float(res.statistic), float(res.pvalue)
        else:
            row["u_statistic"] = row["p_value"] = np.nan
        for c in extra:
            row[f"mean_{c}"] = float(group[c].mean())
        rows.append(row)
    seen = {r["gene"] for r in rows}
    for gene in listed or ():
        if gene not in seen:
            rows.append({"gene": gene, "n_cells": 0, "n_null": 0})
    columns = ["gene", "n_cells", f"mean_{measure}", f"std_{measure}", "null_mean", "n_null", "effect",
               "u_statistic", "p_value"] + [f"mean_{c}" for c in extra]
    frame = pd.DataFrame(rows, columns=columns)
    if n_cells_absent is not None:
        frame.insert(2, "n_cells_absent", [int(n_cells_absent.get(g, 0)) for g in frame["gene"]])
    frame.insert(frame.columns.get_loc("p_value") + 1, "fdr", benjamini_hochberg(frame["p_value"]))
    frame["_abs"] = -frame["effect"].abs()
    frame = frame.sort_values(["fdr", "p_value", "_abs"], na_position="last", kind="stable").drop(columns="_abs")
    frame.insert(0, "rank", np.arange(1, len(frame) + 1))
    return frame.reset_index(drop=True)
