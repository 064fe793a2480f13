"""Paired comparison of the fine-tuned model with the linear baseline over the same folds.

For every scalar test metric both have, the per-fold difference model minus baseline,
its mean and sample standard deviation over folds, and a paired test: the Wilcoxon
signed-rank test (scipy, two-sided) when there are at least :data:`MIN_FOLDS_WILCOXON`
folds, otherwise the sign of every fold's difference (too few folds for a test to mean
anything). The result is stated as a sentence, e.g.
"LoRA 0.77 vs logistic regression 0.90: baseline better in 3 of 3 folds".
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd

from geneformer_peft.evaluation.metrics import SCALAR_METRICS

__all__ = [
    "BASELINE_NAME",
    "MIN_FOLDS_WILCOXON",
    "comparison_rows",
    "comparison_sentence",
    "format_comparison_table",
    "method_display_name",
    "paired_comparison",
]

MIN_FOLDS_WILCOXON = 5
BASELINE_NAME = "logistic regression"
#: the metric the sentence is about
HEADLINE_METRIC = "macro_f1"

_DISPLAY = {"lora": "LoRA", "prefix_prompt": "prefix prompt", "Gene_token_prompt": "gene-token prompt",
            "encoder_prompt": "encoder adapters", "ia3": "IA3", "dora": "DoRA"}


def method_display_name(prompt_type: str) -> str:
    """A readable name of a method: ``""`` -> "full fine-tuning", ``"lora"`` -> "LoRA",
    ``"Gene_token_prompt,lora"`` -> "gene-token prompt + LoRA"."""
    parts = [p for p in str(prompt_type or "").split(",") if p]
    if not parts:
        return "full fine-tuning"
    return " + ".join(_DISPLAY.get(p, p) for p in parts)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool) \
        and math.isfinite(float(value))


def _fold_column(fold_id: Any) -> str:
    return f"fold_{fold_id}"


def _paired_test(diffs: np.ndarray) -> dict[str, Any]:
    n = int(diffs.size)
    better = int((diffs > 0).sum())
    worse = int((diffs < 0).sum())
    test: dict[str, Any] = {"model_better": better, "baseline_better": worse, "ties": n - better - worse}
    if n >= MIN_FOLDS_WILCOXON:
        if better + worse == 0:
            test.update({"test": "wilcoxon", "statistic": 0.0, "p_value": 1.0})
        else:
            from scipy.stats import wilcoxon

            res = wilcoxon(diffs, zero_method="wilcox", alternative="two-sided")
            test.update({"test": "wilcoxon", "statistic": float(res.statistic), "p_value": float(res.pvalue)})
    else:
        test.update({"test": "sign", "signs": [int(np.sign(d)) for d in diffs]})
    return test


def paired_comparison(model_metrics: Sequence[Mapping[str, Any]], baseline_metrics: Sequence[Mapping[str, Any]],
                      fold_ids: Sequence[Any], *, model_name: str = "model",
                      baseline_name: str = BASELINE_NAME,
                      metric_names: Sequence[str] = SCALAR_METRICS) -> dict[str, Any]:
    """Per-fold differences model minus baseline and a paired test for every metric.

    Parameters
    ----------
    model_metrics, baseline_metrics : sequence of mapping
        One metrics dict per fold, in the same fold order (``metrics.json`` and
        ``baseline_metrics.json`` of each fold).
    fold_ids : sequence
        The folds' ids.
    model_name, baseline_name : str
        Names used in the sentence.
    metric_names : sequence of str
        Metrics to compare (those missing from a fold of either side are left out).

    Returns
    -------
    dict
        ``{"model": str, "baseline": str, "fold_ids": [...], "n_folds": int, "headline": str,
        "sentence": str, "metrics": {name: {"model_mean", "baseline_mean", "diff_mean",
        "diff_std", "diffs": {"fold_<id>": float}, "model_better", "baseline_better", "ties",
        "test": "wilcoxon" | "sign", and "statistic", "p_value" or "signs"}}}``.
        ``diff_std`` is the sample standard deviation (ddof=1), 0.0 for one fold.

    Raises
    ------
    ValueError
        If the three sequences differ in length or are empty.
    """
    fold_ids = list(fold_ids)
    if not (len(model_metrics) == len(baseline_metrics) == len(fold_ids)):
        raise ValueError(f"got {len(model_metrics)} model metrics, {len(baseline_metrics)} baseline metrics and "
                         f"{len(fold_ids)} fold ids; expected equal counts")
    if not fold_ids:
        raise ValueError("no folds to compare; expected at least one")
    columns = [_fold_column(f) for f in fold_ids]
    out: dict[str, Any] = {}
    for name in metric_names:
        pairs = [(m.get(name), b.get(name)) for m, b in zip(model_metrics, baseline_metrics)]
        if not all(_is_number(a) and _is_number(b) for a, b in pairs):
            continue
        model = np.array([float(a) for a, _ in pairs])
        base = np.array([float(b) for _, b in pairs])
        diffs = model - base
        entry = {
            "model_mean": float(model.mean()), "baseline_mean": float(base.mean()),
            "diff_mean": float(diffs.mean()),
            "diff_std": float(np.std(diffs, ddof=1)) if diffs.size > 1 else 0.0,
            "diffs": {c: float(d) for c, d in zip(columns, diffs)},
        }
        entry.update(_paired_test(diffs))
        out[name] = entry
    result = {"model": model_name, "baseline": baseline_name, "fold_ids": fold_ids, "n_folds": len(fold_ids),
              "headline": HEADLINE_METRIC, "metrics": out}
    result["sentence"] = comparison_sentence(result)
    return result


def comparison_sentence(comparison: Mapping[str, Any], metric: str | None = None) -> str:
    """The plain statement of one metric's comparison.

    E.g. "LoRA 0.77 vs logistic regression 0.90: baseline better in 3 of 3 folds", with
    ", Wilcoxon signed-rank p = 0.062" appended where the test ran.

    Parameters
    ----------
    comparison : mapping
        As returned by :func:`paired_comparison`.
    metric : str, optional
        Default: the headline metric (macro-F1).

    Returns
    -------
    str
    """
    metric = metric or comparison.get("headline", HEADLINE_METRIC)
    entry = comparison["metrics"].get(metric)
    if entry is None:
        return f"{comparison['model']} vs {comparison['baseline']}: no {metric} to compare"
    n = comparison["n_folds"]
    head = f"{comparison['model']} {entry['model_mean']:.2f} vs {comparison['baseline']} {entry['baseline_mean']:.2f}"
    if metric != HEADLINE_METRIC:
        head = f"{metric}: {head}"
    better, worse, ties = entry["model_better"], entry["baseline_better"], entry["ties"]
    if worse > better:
        verdict = f"baseline better in {worse} of {n} folds"
    elif better > worse:
        verdict = f"model better in {better} of {n} folds"
    else:
        verdict = f"each better in {better} of {n} folds"
    if ties:
        verdict += f" ({ties} tied)"
    if entry.get("test") == "wilcoxon":
        verdict += f", Wilcoxon signed-rank p = {entry['p_value']:.3g}"
    else:
        verdict += f" (fewer than {MIN_FOLDS_WILCOXON} folds: no test)"
    return f"{head}: {verdict}"


def format_comparison_table(comparison: Mapping[str, Any]) -> str:
    """Aligned text table: metric, model mean, baseline mean, difference mean ± sd, test.

    Parameters
    ----------
    comparison : mapping
        As returned by :func:`paired_comparison`.

    Returns
    -------
    str
        A title line, the table, and the headline sentence.
    """
    metrics = comparison["metrics"]
    header = ("metric", "model", "baseline", "model - baseline", "paired test")
    rows = []
    for name, e in metrics.items():
        if e["test"] == "wilcoxon":
            test = f"Wilcoxon p = {e['p_value']:.3g}"
        else:
            test = "signs " + " ".join({1: "+", -1: "-", 0: "0"}[s] for s in e["signs"])
        spread = f" ± {e['diff_std']:.4f}" if len(e.get("diffs") or {}) > 1 else ""  # one fold: no spread measured
        rows.append((name, f"{e['model_mean']:.4f}", f"{e['baseline_mean']:.4f}", f"{e['diff_mean']:+.4f}{spread}",
                     test))
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    fmt = lambda r: "  ".join(v.ljust(w) if i in (0, 4) else v.rjust(w)
                              for i, (v, w) in enumerate(zip(r, widths))).rstrip()
    title = (f"{comparison['model']} vs {comparison['baseline']} on the same {comparison['n_folds']} "
             f"fold{'s' if comparison['n_folds'] != 1 else ''} (paired):")
    lines = [title, fmt(header), "-" * len(fmt(header)), *(fmt(r) for r in rows), comparison_sentence(comparison)]
    return "\n".join(lines)


def comparison_rows(summary: Mapping[str, Any]) -> pd.DataFrame:
    """Rows of ``summary.csv`` for the baseline and the paired differences.

    ``baseline_<metric>`` rows hold the baseline's per-fold values, mean and std;
    ``diff_<metric>`` rows the per-fold differences model minus baseline, their mean and
    std. Columns as :func:`~geneformer_peft.evaluation.outputs.summary_frame`.

    Parameters
    ----------
    summary : mapping
        A run summary with ``folds`` and, when a baseline ran, ``baseline`` (a
        :func:`~geneformer_peft.evaluation.outputs.summarize_folds` result) and
        ``comparison`` (a :func:`paired_comparison` result).

    Returns
    -------
    pandas.DataFrame
        Empty when the summary has no baseline.
    """
    columns = [*summary["folds"], "mean", "std"]
    rows: dict[str, dict[str, Any]] = {}
    baseline = summary.get("baseline") or {}
    for name, entry in (baseline.get("metrics") or {}).items():
        if name in SCALAR_METRICS or name in ("mean_confidence", "C", "baseline_seconds"):
            rows[f"baseline_{name}"] = {**entry["values"], "mean": entry["mean"], "std": entry["std"]}
    comparison = summary.get("comparison") or {}
    for name, entry in (comparison.get("metrics") or {}).items():
        rows[f"diff_{name}"] = {**entry["diffs"], "mean": entry["diff_mean"], "std": entry["diff_std"]}
    frame = pd.DataFrame.from_dict(rows, orient="index", columns=columns)
    frame.index.name = "metric"
    return frame
