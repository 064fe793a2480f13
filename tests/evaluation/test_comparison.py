"""Paired comparison of model and baseline: per-fold differences, the paired test, the
plain sentence, the summary rows and the per-class F1 figure."""
from __future__ import annotations

import importlib.util

import numpy as np
import pytest
from scipy.stats import wilcoxon

from geneformer_peft.evaluation import comparison as cmp


def _metrics(values: dict[str, float]) -> dict:
    return {**values, "per_class": {"a": {"f1": 0.5}}, "prompt_type": "lora"}


def test_three_folds_sign_and_sentence():
    model = [_metrics({"macro_f1": v, "accuracy": a}) for v, a in ((0.76, 0.8), (0.78, 0.9), (0.77, 0.85))]
    base = [_metrics({"macro_f1": v, "accuracy": a}) for v, a in ((0.90, 0.7), (0.91, 0.9), (0.89, 0.95))]
    out = cmp.paired_comparison(model, base, [0, 1, 2], model_name=cmp.method_display_name("lora"))
    entry = out["metrics"]["macro_f1"]
    diffs = np.array([0.76 - 0.90, 0.78 - 0.91, 0.77 - 0.89])
    assert list(entry["diffs"]) == ["fold_0", "fold_1", "fold_2"]
    assert list(entry["diffs"].values()) == pytest.approx(diffs)
    assert entry["diff_mean"] == pytest.approx(diffs.mean())
    assert entry["diff_std"] == pytest.approx(np.std(diffs, ddof=1))
    assert entry["test"] == "sign" and entry["signs"] == [-1, -1, -1]
    assert out["sentence"].startswith("LoRA 0.77 vs logistic regression 0.90: baseline better in 3 of 3 folds")
    acc = out["metrics"]["accuracy"]
    assert (acc["model_better"], acc["baseline_better"], acc["ties"]) == (1, 1, 1)
    assert "each better in 1 of 3 folds (1 tied)" in cmp.comparison_sentence(out, "accuracy")
    assert set(out["metrics"]) == {"macro_f1", "accuracy"}  # only metrics both sides have


def test_five_folds_wilcoxon_equals_scipy():
    rng = np.random.default_rng(0)
    m, b = rng.random(5), rng.random(5)
    out = cmp.paired_comparison([{"macro_f1": v} for v in m], [{"macro_f1": v} for v in b], list(range(5)),
                                model_name="gene-token prompt")
    entry = out["metrics"]["macro_f1"]
    ref = wilcoxon(m - b)
    assert entry["test"] == "wilcoxon"
    assert entry["p_value"] == pytest.approx(ref.pvalue) and entry["statistic"] == pytest.approx(ref.statistic)
    assert "Wilcoxon signed-rank p =" in out["sentence"]
    same = cmp.paired_comparison([{"macro_f1": 0.5}] * 5, [{"macro_f1": 0.5}] * 5, list(range(5)))
    assert same["metrics"]["macro_f1"]["p_value"] == 1.0


def test_table_and_summary_rows():
    model = [{"macro_f1": 0.8}, {"macro_f1": 0.7}]
    base = [{"macro_f1": 0.75, "C": 1.0}, {"macro_f1": 0.9, "C": 10.0}]
    out = cmp.paired_comparison(model, base, [3, 4], model_name="full fine-tuning")
    table = cmp.format_comparison_table(out)
    assert "macro_f1" in table and "signs + -" in table and out["sentence"] in table
    from geneformer_peft.evaluation.outputs import summarize_folds

    summary = summarize_folds(model, [3, 4])
    summary["baseline"] = summarize_folds(base, [3, 4])
    summary["comparison"] = out
    rows = cmp.comparison_rows(summary)
    assert rows.loc["diff_macro_f1", ["fold_3", "fold_4"]].tolist() == pytest.approx([0.05, -0.2])
    assert rows.loc["baseline_macro_f1", "mean"] == pytest.approx(0.825)
    assert rows.loc["baseline_C", "fold_4"] == 10.0
    with pytest.raises(ValueError, match="equal counts"):
        cmp.paired_comparison(model, base[:1], [3, 4])


def test_display_names():
    assert cmp.method_display_name("") == "full fine-tuning"
    assert cmp.method_display_name("Gene_token_prompt,lora") == "gene-token prompt + LoRA"


@pytest.mark.skipif(importlib.util.find_spec("matplotlib") is None, reason="matplotlib not installed")
def test_per_class_f1_figure(tmp_path):
    from geneformer_peft.evaluation.comparison_plots import plot_per_class_f1

    model = {"a": {"f1": 0.9, "support": 3}, "b": {"f1": 0.4, "support": 5}}
    base = {"a": {"f1": 0.7, "support": 3}, "b": {"f1": 0.8, "support": 5}}
    path = plot_per_class_f1(model, base, tmp_path / "f1.png", model_name="LoRA")
    assert path.stat().st_size > 0 and not list(tmp_path.glob("*.tmp*"))
    with pytest.raises(ValueError, match="classes \\['b'\\]"):
        plot_per_class_f1(model, {"a": base["a"]}, tmp_path / "g.png")
