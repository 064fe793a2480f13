"""End to end: the fine-tuning job's per-fold outputs (docs/outputs.md), run folder names,
the cross-fold summary, and predictions reproduced from the saved fold models."""
from __future__ import annotations

import importlib.util
import pickle

import numpy as np
import pandas as pd
import pytest
import torch

import job_factories as jf

METHODS = ["", "lora", "prefix_prompt", "Gene_token_prompt", "encoder_prompt", "Gene_token_prompt,lora"]
CSV_HEAD = ["index", "gt_celltype", "pred_celltype", "gt_cellcode", "pred_cellcode", "confidence"]
METRIC_KEYS = ("accuracy", "balanced_accuracy", "macro_precision", "macro_recall", "macro_f1", "micro_precision",
               "micro_recall", "micro_f1", "per_class", "confusion_matrix", "trainable_parameters",
               "total_parameters", "train_seconds", "train_cells_per_second")


def _test_cells(job_data, fold):
    from datasets import load_from_disk

    return load_from_disk(str(job_data.fold_file(fold, "test")))


def _reference_probabilities(model, dataset) -> np.ndarray:
    """Softmax of the model's logits, one cell at a time (no padding, no batching)."""
    model.eval()
    out = []
    with torch.no_grad():
        for ids in dataset["input_ids"]:
            ids = torch.tensor([ids[:model.config.max_position_embeddings]])
            out.append(torch.softmax(model(ids, torch.ones_like(ids)).logits, dim=-1)[0].numpy())
    return np.stack(out)


@pytest.mark.parametrize("prompt_type", METHODS, ids=lambda p: p or "full")
def test_fold_outputs(prompt_type, job_data, finished_runs):
    from safetensors.torch import load_file

    from transformerslocal import BertConfig, BertForSequenceClassification, trainable_parameter_names

    run = finished_runs(prompt_type)
    expected_name = "_".join(p for p in prompt_type.split(",") if p) or "full_finetune"
    assert run == run.parents[1] / expected_name / job_data.dataset_name
    assert run.is_dir(), f"run folder {run} missing; found {sorted(p.name for p in run.parents[1].iterdir())}"
    labels = list(job_data.labels)
    for fold in range(job_data.n_folds):
        fold_dir = run / str(fold)
        test = _test_cells(job_data, fold)

        frame = pd.read_csv(fold_dir / "predictions.csv")
        assert list(frame.columns) == CSV_HEAD + [f"prob_{name}" for name in labels]
        assert len(frame) == len(test)
        assert frame["index"].tolist() == list(range(len(test)))
        assert frame["gt_celltype"].tolist() == [str(v) for v in test[jf.LABEL_COLUMN]]
        assert frame["gt_celltype"].map(labels.index).tolist() == frame["gt_cellcode"].tolist()
        assert frame["pred_celltype"].map(labels.index).tolist() == frame["pred_cellcode"].tolist()
        probs = jf.assert_probabilities(frame, labels)
        assert (probs.argmax(axis=1) == frame["pred_cellcode"].to_numpy()).all()

        config = jf.read_json(fold_dir / "config.json")
        assert config["prompt_type"] == prompt_type
        assert config["id2label"] == {str(i): name for i, name in enumerate(labels)}
        assert config["label2id"] == {name: i for i, name in enumerate(labels)}
        assert (fold_dir / "pytorch_model.bin").is_file()

        peft = load_file(str(fold_dir / "peft_model.safetensors"))
        model = BertForSequenceClassification(BertConfig.from_pretrained(fold_dir))
        assert set(peft) == set(trainable_parameter_names(model))
        if prompt_type:
            assert set(peft) < set(model.state_dict()), "PEFT weights must be a strict part of the model"

        with open(fold_dir / "predictions.pickle", "rb") as handle:
            saved = pickle.load(handle)
        np.testing.assert_allclose(saved["probabilities"], probs, atol=1e-6)
        assert np.asarray(saved["logits"]).shape == (len(test), len(labels))
        assert list(saved["labels"]) == frame["gt_cellcode"].tolist()

        metrics = jf.read_json(fold_dir / "metrics.json")
        for key in METRIC_KEYS:
            assert key in metrics, f"metrics.json of {fold_dir} lacks {key!r}"
        assert metrics["accuracy"] == pytest.approx((frame["gt_cellcode"] == frame["pred_cellcode"]).mean())
        assert np.asarray(metrics["confusion_matrix"]).sum() == len(test)
        assert set(metrics["per_class"]) == set(labels)
        assert metrics["prompt_type"] == prompt_type
        assert 0 < metrics["trainable_parameters"] <= metrics["total_parameters"]
        if prompt_type:
            assert metrics["trainable_parameters"] < metrics["total_parameters"]
        else:
            assert metrics["trainable_parameters"] == metrics["total_parameters"]
        assert metrics["train_seconds"] > 0 and metrics["train_cells_per_second"] > 0
        assert jf.read_json(fold_dir / "fold_done.json")["files"]
        if importlib.util.find_spec("matplotlib") is not None:
            assert (fold_dir / "confusion_matrix.png").stat().st_size > 0
            assert (fold_dir / "training_curves.png").stat().st_size > 0
    assert not any((run / ".resume").glob("*/*.pt")), "finished folds must leave no resume checkpoint"


@pytest.mark.parametrize("prompt_type", ["", "Gene_token_prompt,lora"], ids=["full", "combination"])
def test_summary_is_mean_and_std_over_folds(prompt_type, job_data, finished_runs):
    run = finished_runs(prompt_type)
    folds = [jf.read_json(run / str(i) / "metrics.json") for i in range(job_data.n_folds)]
    summary = jf.read_json(run / "summary.json")
    table = pd.read_csv(run / "summary.csv", index_col="metric")
    for name in ("accuracy", "balanced_accuracy", "macro_f1", "micro_f1", "macro_precision", "macro_recall",
                 "trainable_parameters", "train_seconds"):
        values = np.array([m[name] for m in folds], dtype=float)
        entry = summary["metrics"][name]
        assert entry["mean"] == pytest.approx(np.mean(values))
        assert entry["std"] == pytest.approx(np.std(values, ddof=1), abs=1e-12)
        assert table.loc[name, "mean"] == pytest.approx(np.mean(values))
        assert table.loc[name, "std"] == pytest.approx(np.std(values, ddof=1), abs=1e-9)
        assert [table.loc[name, f"fold_{i}"] for i in range(job_data.n_folds)] == pytest.approx(values)


def test_out_prefix_names_the_run_folder(job_data, tmp_path):
    assert jf.run_finetune(job_data.finetune_argv(tmp_path, "--prompt_type", "lora", "--out_prefix", "try1_",
                                                  "--folds", "0", "--epoch", "1")) == 0
    assert (tmp_path / "try1_lora" / job_data.dataset_name / "0" / "fold_done.json").is_file()


@pytest.mark.parametrize("prompt_type", ["", "lora", "prefix_prompt"], ids=["full", "lora", "prefix_prompt"])
def test_reloaded_fold_model_reproduces_predictions(prompt_type, job_data, finished_runs):
    from transformerslocal import BertForSequenceClassification

    fold_dir = finished_runs(prompt_type) / "0"
    model = BertForSequenceClassification.from_pretrained(fold_dir)
    expected = jf.assert_probabilities(pd.read_csv(fold_dir / "predictions.csv"), job_data.labels)
    np.testing.assert_allclose(_reference_probabilities(model, _test_cells(job_data, 0)), expected, atol=1e-5)


@pytest.mark.parametrize("use_base", [False, True], ids=["full_weights", "peft_on_base"])
def test_predict_command_matches_predictions_csv(use_base, job_data, finished_runs, tmp_path):
    from geneformer_peft.cli import main

    fold_dir = finished_runs("Gene_token_prompt" if use_base else "")  / "0"
    out = tmp_path / "x.csv"
    argv = ["predict", "--model_path", str(fold_dir), "--input", str(job_data.fold_file(0, "test")),
            "--output", str(out), "--device", "cpu"]
    if use_base:
        argv += ["--base_model", str(job_data.model_path)]
    assert main(argv) == 0
    got, expected = pd.read_csv(out), pd.read_csv(fold_dir / "predictions.csv")
    assert list(got.columns) == list(expected.columns)
    pd.testing.assert_frame_equal(got.drop(columns=[c for c in got if c.startswith(("prob_", "confidence"))]),
                                  expected.drop(columns=[c for c in got if c.startswith(("prob_", "confidence"))]))
    np.testing.assert_allclose(got.filter(like="prob_").to_numpy(), expected.filter(like="prob_").to_numpy(),
                               atol=1e-5)


def test_predict_without_labels_leaves_out_ground_truth(job_data, finished_runs, tmp_path):
    from geneformer_peft.cli import main

    fold_dir = finished_runs("lora") / "0"
    unlabelled = tmp_path / "unlabelled.dataset"
    _test_cells(job_data, 0).remove_columns([jf.LABEL_COLUMN]).save_to_disk(str(unlabelled))
    out = tmp_path / "x.csv"
    assert main(["predict", "--model_path", str(fold_dir), "--input", str(unlabelled), "--output", str(out),
                 "--device", "cpu"]) == 0
    got, expected = pd.read_csv(out), pd.read_csv(fold_dir / "predictions.csv")
    assert not [c for c in got.columns if c.startswith("gt_")]
    assert list(got.columns) == [c for c in expected.columns if not c.startswith("gt_")]
    np.testing.assert_allclose(got.filter(like="prob_").to_numpy(), expected.filter(like="prob_").to_numpy(),
                               atol=1e-5)
