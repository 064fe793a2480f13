"""The linear baseline inside the fine-tuning job: per-fold files for every method, the
summary's paired comparison, skip/resume reading it back, and ``--baselines none``."""
from __future__ import annotations

import importlib.util

import job_factories as jf
import numpy as np
import pandas as pd
import pytest

from geneformer_peft.evaluation.metrics import SCALAR_METRICS

METHODS = ["", "lora", "prefix_prompt", "Gene_token_prompt", "encoder_prompt", "Gene_token_prompt,lora"]


@pytest.mark.parametrize("prompt_type", METHODS, ids=lambda p: p or "full")
def test_baseline_files_in_every_fold(prompt_type, job_data, finished_runs):
    from datasets import load_from_disk

    run = finished_runs(prompt_type)
    labels = list(job_data.labels)
    for fold in range(job_data.n_folds):
        fold_dir = run / str(fold)
        test = load_from_disk(str(job_data.fold_file(fold, "test")))
        model = jf.read_json(fold_dir / "metrics.json")
        base = jf.read_json(fold_dir / "baseline_metrics.json")
        for key in (*SCALAR_METRICS, "per_class", "confusion_matrix", "labels", "n_cells"):
            assert key in base, f"baseline_metrics.json of {fold_dir} lacks {key!r}"
        assert base["labels"] == model["labels"] and base["n_cells"] == len(test)
        assert base["baseline"] == "logreg" and base["features"] == "tokens"
        assert base["C"] in (0.01, 0.1, 1.0, 10.0, 100.0) and base["baseline_seconds"] > 0
        frame = pd.read_csv(fold_dir / "baseline_predictions.csv")
        assert list(frame.columns) == list(pd.read_csv(fold_dir / "predictions.csv").columns)
        assert frame["gt_celltype"].tolist() == [str(v) for v in test[jf.LABEL_COLUMN]]
        jf.assert_probabilities(frame, labels)
        assert base["accuracy"] == pytest.approx((frame["gt_cellcode"] == frame["pred_cellcode"]).mean())
        done = jf.read_json(fold_dir / "fold_done.json")["files"]
        assert "baseline_metrics.json" in done and "baseline_predictions.csv" in done
        if importlib.util.find_spec("matplotlib") is not None:
            assert (fold_dir / "baseline_per_class_f1.png").stat().st_size > 0
    assert "logistic-regression baseline" in (run / "run.log").read_text(encoding="utf-8")


@pytest.mark.parametrize("prompt_type", ["", "Gene_token_prompt,lora"], ids=["full", "combination"])
def test_summary_paired_differences_equal_per_fold_numbers(prompt_type, job_data, finished_runs):
    run = finished_runs(prompt_type)
    folds = list(range(job_data.n_folds))
    model = [jf.read_json(run / str(i) / "metrics.json") for i in folds]
    base = [jf.read_json(run / str(i) / "baseline_metrics.json") for i in folds]
    summary = jf.read_json(run / "summary.json")
    table = pd.read_csv(run / "summary.csv", index_col="metric")
    comparison = summary["comparison"]
    assert comparison["fold_ids"] == folds and comparison["n_folds"] == len(folds)
    for name in SCALAR_METRICS:
        diffs = np.array([m[name] - b[name] for m, b in zip(model, base)])
        entry = comparison["metrics"][name]
        assert list(entry["diffs"].values()) == pytest.approx(diffs)
        assert entry["diff_mean"] == pytest.approx(diffs.mean())
        assert entry["diff_std"] == pytest.approx(np.std(diffs, ddof=1), abs=1e-12)
        assert entry["test"] == "sign"  # two folds: no Wilcoxon
        assert entry["signs"] == [int(np.sign(d)) for d in diffs]
        assert summary["baseline"]["metrics"][name]["mean"] == pytest.approx(np.mean([b[name] for b in base]))
        assert [table.loc[f"diff_{name}", f"fold_{i}"] for i in folds] == pytest.approx(diffs)
        assert table.loc[f"baseline_{name}", "mean"] == pytest.approx(np.mean([b[name] for b in base]))
    assert comparison["model"] == ("full fine-tuning" if not prompt_type else "gene-token prompt + LoRA")
    assert comparison["sentence"].startswith(f"{comparison['model']} ")
    assert comparison["sentence"] in (run / "run.log").read_text(encoding="utf-8")


def test_finished_folds_read_their_baseline_back(job_data, finished_runs, tmp_path):
    from geneformer_peft.cli import main

    run = finished_runs("lora")
    before = jf.read_json(run / "summary.json")["comparison"]
    output = run.parents[1]
    assert main(["finetune", *job_data.finetune_argv(output, "--prompt_type", "lora")]) == 0  # every fold skipped
    after = jf.read_json(run / "summary.json")["comparison"]
    assert after["metrics"]["macro_f1"] == before["metrics"]["macro_f1"]
    assert "finished earlier, skipped" in (run / "run.log").read_text(encoding="utf-8")


def test_baselines_none_writes_none(job_data, tmp_path):
    assert jf.run_finetune(job_data.finetune_argv(tmp_path, "--prompt_type", "lora", "--folds", "0",
                                                  "--epoch", "1", "--baselines", "none")) == 0
    run = jf.run_dir(tmp_path, "lora", job_data)
    assert not list(run.rglob("baseline_*"))
    summary = jf.read_json(run / "summary.json")
    assert "baseline" not in summary and "comparison" not in summary
    table = pd.read_csv(run / "summary.csv", index_col="metric")
    assert not [i for i in table.index if i.startswith(("baseline_", "diff_"))]
    log = (run / "run.log").read_text(encoding="utf-8")
    assert "logistic-regression baseline" not in log and "logistic regression" not in log


def test_expression_features_without_expression_columns_fail_before_training(job_data, tmp_path):
    code = jf.run_finetune(job_data.finetune_argv(tmp_path, "--prompt_type", "lora", "--folds", "0",
                                                  "--baseline_features", "expression"))
    assert code == 2  # DataError, naming the columns, before any fold trains
    assert not (jf.run_dir(tmp_path, "lora", job_data) / "0").exists()
