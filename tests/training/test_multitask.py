"""Multi-task cell classification (``--label_column cell_type,state``): the loss, the one-task
equality with the single-task trainer, and a two-task run's outputs, selection and resume."""
from __future__ import annotations

import json
import logging

import numpy as np
import pandas as pd
import pytest
import torch

import job_factories as jf
from geneformer_peft.data.cells import EncodedCells
from geneformer_peft.data.folds import fold_paths
from geneformer_peft.errors import DataError
from geneformer_peft.training import trainer as trainer_module
from geneformer_peft.training.arguments import TrainingArguments
from geneformer_peft.training.cross_validation import RunOptions
from geneformer_peft.training.multitask import (
    MISSING,
    MultiTaskLoss,
    TaskSet,
    is_missing,
    parse_task_weights,
    task_columns,
)
from geneformer_peft.training.trainer import FoldTrainer
from transformerslocal import BertConfig, BertForSequenceClassification, mark_trainable

TINY = dict(vocab_size=60, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37,
            max_position_embeddings=64, hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1)
STATE = "state"


def with_state(dataset, seed: int):
    """The split with a ``state`` column cutting across cell types; every 7th cell lacks it."""
    rng = np.random.default_rng(seed)
    states = rng.choice(["cycling", "resting"], size=len(dataset)).tolist()
    return dataset.add_column(STATE, [None if i % 7 == 3 else s for i, s in enumerate(states)])


@pytest.fixture(scope="module")
def mt_data(job_data, tmp_path_factory):
    """job_data's folds with a second label column (``state``, some cells without it)."""
    from geneformer_peft.data.dataset_io import load_saved_dataset

    root = tmp_path_factory.mktemp("mt_data")
    for fold in range(job_data.n_folds):
        for k, (split, path) in enumerate(fold_paths(job_data.data_path, job_data.dataset_name, fold).items()):
            out = fold_paths(root, job_data.dataset_name, fold)[split]
            out.parent.mkdir(parents=True, exist_ok=True)
            with_state(load_saved_dataset(path), 10 * fold + k).save_to_disk(str(out))
    return root


def mt_argv(job_data, data_path, output, *extra):
    return ["--dataset_name", job_data.dataset_name, "--data_path", str(data_path), "--model_path",
            str(job_data.model_path), "--output_path", str(output), *jf.FAST_FLAGS, "--folds", "0",
            "--label_column", f"cell_type,{STATE}", *extra]


@pytest.fixture(scope="module")
def mt_run(job_data, mt_data, tmp_path_factory):
    output = tmp_path_factory.mktemp("mt_runs")
    assert jf.run_finetune(mt_argv(job_data, mt_data, output, "--prompt_type", "lora", "--epoch", "3")) == 0
    return jf.run_dir(output, "lora", job_data)


# ----------------------------------------------------------------------------- options and labels


def test_label_columns_and_task_weights_are_parsed_and_checked():
    assert task_columns("cell_type, state") == ["cell_type", "state"]
    assert task_columns(["cell_type"]) == ["cell_type"]
    with pytest.raises(DataError, match="more than once"):
        task_columns("a,a")
    with pytest.raises(DataError, match="none empty"):
        task_columns("a,")
    assert parse_task_weights("1,0.5", 2) == [1.0, 0.5]
    assert parse_task_weights("uncertainty", 2) == "uncertainty"
    for bad in ("1", "1,x", "0,0", "-1,1"):
        with pytest.raises(DataError, match="--task_weights"):
            parse_task_weights(bad, 2)


def test_one_column_is_the_single_task_job(tmp_path):
    """A one-element list takes the single-task path (same outputs and file names as before)."""
    base = dict(dataset_name="d", data_path=tmp_path, output_path=tmp_path, model_path=tmp_path)
    assert RunOptions(**base, label_column=["cell_type"]).label_column == "cell_type"
    assert RunOptions(**base, label_column="cell_type,state").label_column == ["cell_type", "state"]
    with pytest.raises(DataError, match="names one task"):
        RunOptions(**base, label_column="cell_type", task_weights="1")


def test_missing_labels_are_masked_and_unlabelled_cells_refused():
    import datasets

    ds = datasets.Dataset.from_dict({"a": ["x", "y", None, "x"], "b": ["p", "", "q", None]})
    tasks = TaskSet.from_datasets({"train": ds}, ["a", "b"])
    assert [t.labels for t in tasks] == [("x", "y"), ("p", "q")]
    assert tasks.label2id == {"a:x": 0, "a:y": 1, "b:p": 2, "b:q": 3}
    np.testing.assert_array_equal(tasks.encode(ds), [[0, 0], [1, MISSING], [MISSING, 1], [0, MISSING]])
    assert is_missing(float("nan")) and is_missing(" ") and not is_missing(0)
    bad = datasets.Dataset.from_dict({"a": ["x", None], "b": ["p", None]})
    with pytest.raises(DataError, match=r"fold 0 train: 1 cells have no label in any of the columns \['a', 'b'\]"):
        tasks.encode(bad, name="fold 0 train")


def test_the_loss_is_the_weighted_sum_over_labelled_cells():
    tasks = TaskSet([("a", ["x", "y", "z"]), ("b", ["p", "q"])])
    torch.manual_seed(0)
    logits = torch.randn(6, 5)
    labels = torch.tensor([[0, 1], [2, MISSING], [1, 0], [MISSING, 1], [0, 0], [2, MISSING]])
    ce_a = torch.nn.functional.cross_entropy(logits[[0, 1, 2, 4, 5], :3], labels[[0, 1, 2, 4, 5], 0])
    ce_b = torch.nn.functional.cross_entropy(logits[[0, 2, 3, 4], 3:], labels[[0, 2, 3, 4], 1])
    torch.testing.assert_close(MultiTaskLoss(tasks)(logits, labels), ce_a + ce_b)
    torch.testing.assert_close(MultiTaskLoss(tasks, weights=[1.0, 0.25])(logits, labels), ce_a + 0.25 * ce_b)
    learned = MultiTaskLoss(tasks, weights="uncertainty")
    with torch.no_grad():
        learned.log_vars.copy_(torch.tensor([0.5, -1.0]))
    expected = np.exp(-0.5) * ce_a + 0.25 + np.exp(1.0) * ce_b - 0.5
    torch.testing.assert_close(learned(logits, labels), expected.float())
    learned(logits, labels).backward()
    assert learned.log_vars.grad is not None and learned.log_vars.grad.abs().min() > 0
    # a batch without any label of task b: task a alone (no NaN)
    only_a = labels.clone()
    only_a[:, 1] = MISSING
    assert torch.isfinite(MultiTaskLoss(tasks)(logits, only_a))


# ----------------------------------------------------------------------------- one task = single task


def _cells(n: int, seed: int, name: str, *, columns: bool) -> EncodedCells:
    rng = np.random.default_rng(seed)
    lengths = rng.integers(5, 30, size=n)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    labels = rng.integers(0, 3, size=n)
    flat = rng.integers(2, TINY["vocab_size"], size=offsets[-1]).astype(np.int32)
    flat[offsets[:-1]] = 2 + labels
    return EncodedCells(flat, offsets, labels=labels[:, None] if columns else labels, name=name)


def _fit(objective):
    torch.manual_seed(0)
    model = BertForSequenceClassification(BertConfig(**TINY, num_labels=3))
    mark_trainable(model)
    args = TrainingArguments(epochs=3, batch_size=8, lr=2e-2, progress=False, sampler="balanced")
    multi = objective is not None
    weights = torch.tensor([0.3, 0.5, 0.9])
    trainer = FoldTrainer(model, _cells(40, 1, "train", columns=multi), _cells(12, 2, "val", columns=multi), args,
                          class_weights=None if multi else weights, device=torch.device("cpu"),
                          objective=objective(weights) if multi else None)
    fit = trainer.fit()
    _, _, logits = trainer.evaluate(trainer.val_cells)
    return fit.history, logits, {n: p.detach().clone() for n, p in model.named_parameters()}


def test_a_one_task_multitask_fit_equals_the_single_task_fit():
    tasks = TaskSet([("cell_type", ["a", "b", "c"])])
    single = _fit(None)
    multi = _fit(lambda w: MultiTaskLoss(tasks, class_weights=[w]))
    keys = ("epoch", "train_loss", "val_loss", "val_macro_f1")
    assert [{k: h[k] for k in keys} for h in multi[0]] == [{k: h[k] for k in keys} for h in single[0]]
    assert [h["val_macro_f1.cell_type"] for h in multi[0]] == [h["val_macro_f1"] for h in single[0]]
    np.testing.assert_array_equal(multi[1], single[1])
    for name, value in single[2].items():
        assert torch.equal(multi[2][name], value), name


# ----------------------------------------------------------------------------- a two-task run


def test_a_two_task_run_writes_every_output(mt_run):
    fold = mt_run / "0"
    names = {p.name for p in fold.iterdir()}
    for file in ("predictions.csv", "predictions.pickle", "metrics.json", "history.json", "config.json",
                 "pytorch_model.bin", "peft_model.safetensors", "training_curves.png", "provenance.json",
                 "fold_done.json", "confusion_matrix_cell_type.png", "confusion_matrix_state.png",
                 "baseline_metrics.json", "baseline_predictions.csv", "baseline_per_class_f1_cell_type.png",
                 "baseline_per_class_f1_state.png"):
        assert file in names, file
    assert "confusion_matrix.png" not in names
    config = jf.read_json(fold / "config.json")
    assert [t["name"] for t in config["tasks"]] == ["cell_type", STATE]
    assert config["tasks"][1]["labels"] == ["cycling", "resting"]
    frame = pd.read_csv(fold / "predictions.csv", keep_default_na=False)
    assert list(frame.columns[:5]) == ["index", "cell_type_true", "cell_type_pred", "state_true", "state_pred"]
    missing = frame["state_true"] == ""
    assert missing.sum() > 0 and (frame["state_pred"] != "").all()
    probs = frame[["state_prob_cycling", "state_prob_resting"]].to_numpy()
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-5)

    metrics = jf.read_json(fold / "metrics.json")
    per_task = metrics["tasks"]
    assert per_task[STATE]["n_cells"] == len(frame) - missing.sum() == metrics["state.n_cells"]
    assert per_task[STATE]["n_missing"] == missing.sum()
    assert per_task["cell_type"]["n_cells"] == len(frame)
    truth = frame.loc[~missing, "state_true"]
    assert per_task[STATE]["accuracy"] == pytest.approx((truth == frame.loc[~missing, "state_pred"]).mean())
    assert metrics["macro_f1"] == pytest.approx(np.mean([per_task[t]["macro_f1"] for t in per_task]))
    assert metrics["cell_type.macro_f1"] == per_task["cell_type"]["macro_f1"]

    baseline = jf.read_json(fold / "baseline_metrics.json")
    assert set(baseline["tasks"]) == {"cell_type", STATE}
    assert baseline["tasks"][STATE]["n_cells"] == per_task[STATE]["n_cells"]


def test_epochs_are_selected_on_the_mean_of_the_tasks(mt_run):
    history = jf.read_json(mt_run / "0" / "history.json")
    for record in history:
        scores = [record["val_macro_f1.cell_type"], record[f"val_macro_f1.{STATE}"]]
        assert record["val_macro_f1"] == pytest.approx(np.mean(scores))
        losses = [record["val_loss.cell_type"], record[f"val_loss.{STATE}"]]
        assert record["val_loss"] == pytest.approx(np.mean(losses))
    best = min(history, key=lambda h: (-h["val_macro_f1"], h["val_loss"], h["epoch"]))
    metrics = jf.read_json(mt_run / "0" / "metrics.json")
    assert metrics["best_epoch"] == best["epoch"]
    assert metrics["best_val_macro_f1"] == best["val_macro_f1"]


def test_the_summary_is_given_per_task(mt_run):
    summary = jf.read_json(mt_run / "summary.json")
    metrics = jf.read_json(mt_run / "0" / "metrics.json")
    assert set(summary["tasks"]) == {"cell_type", STATE}
    for task in ("cell_type", STATE):
        entry = summary["tasks"][task]
        assert entry["metrics"]["macro_f1"]["mean"] == pytest.approx(metrics["tasks"][task]["macro_f1"])
        assert entry["comparison"]["metrics"]["macro_f1"]["model_mean"] == pytest.approx(
            metrics["tasks"][task]["macro_f1"])
        assert "baseline_mean" in entry["comparison"]["metrics"]["macro_f1"]
    table = pd.read_csv(mt_run / "summary.csv", index_col=0)
    assert {"macro_f1", "cell_type.macro_f1", "state.macro_f1", "baseline_macro_f1"} <= set(table.index)
    assert summary["settings"]["options"]["label_column"] == ["cell_type", STATE]


def test_a_finished_multitask_fold_is_skipped_and_other_tasks_refused(job_data, mt_data, mt_run, caplog):
    output = mt_run.parent.parent
    with caplog.at_level(logging.INFO):
        assert jf.run_finetune(mt_argv(job_data, mt_data, output, "--prompt_type", "lora", "--epoch", "3")) == 0
    assert "fold 0: finished earlier, skipped" in caplog.text
    argv = mt_argv(job_data, mt_data, output, "--prompt_type", "lora", "--epoch", "3", "--task_weights", "1,0.5")
    assert jf.run_finetune(argv) == 2  # other settings than the finished fold's


def test_an_interrupted_multitask_fold_resumes_with_its_learned_weights(job_data, mt_data, tmp_path, monkeypatch):
    argv = ["--prompt_type", "lora", "--epoch", "3", "--early_stopping_patience", "0", "--task_weights",
            "uncertainty", "--baselines", "none"]
    assert jf.run_finetune(mt_argv(job_data, mt_data, tmp_path / "reference", *argv)) == 0
    original = trainer_module.FoldTrainer._save_checkpoint

    def save_then_die(self, epoch, state):
        original(self, epoch, state)
        if epoch == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(trainer_module.FoldTrainer, "_save_checkpoint", save_then_die)
    assert jf.run_finetune(mt_argv(job_data, mt_data, tmp_path / "resumed", *argv)) != 0
    monkeypatch.undo()
    assert jf.run_finetune(mt_argv(job_data, mt_data, tmp_path / "resumed", *argv)) == 0
    runs = [jf.run_dir(tmp_path / name, "lora", job_data) / "0" for name in ("reference", "resumed")]
    metrics = [jf.result_metrics(jf.read_json(run / "metrics.json")) for run in runs]
    assert metrics[0] == metrics[1]
    weights = metrics[0]["task_weights"]
    assert weights["cell_type"] != 1.0 and weights[STATE] != 1.0  # learned
    histories = [[{k: v for k, v in h.items() if "second" not in k} for h in jf.read_json(run / "history.json")]
                 for run in runs]
    assert histories[0] == histories[1]


def test_cells_without_any_label_are_refused_before_training(job_data, mt_data, tmp_path):
    from geneformer_peft.data.dataset_io import load_saved_dataset
    from geneformer_peft.training.cross_validation import run_cross_validation

    data = tmp_path / "data"
    for split, path in fold_paths(mt_data, job_data.dataset_name, 0).items():
        ds = load_saved_dataset(path)
        if split == "val":
            ds = ds.map(lambda row, i: {"cell_type": None if i < 2 else row["cell_type"],
                                        STATE: None if i < 2 else row[STATE]}, with_indices=True)
        out = fold_paths(data, job_data.dataset_name, 0)[split]
        out.parent.mkdir(parents=True, exist_ok=True)
        ds.save_to_disk(str(out))
    opts = RunOptions(dataset_name=job_data.dataset_name, data_path=data, output_path=tmp_path / "out",
                      model_path=job_data.model_path, label_column=["cell_type", STATE], folds=[0],
                      training=TrainingArguments(epochs=1, device="cpu", progress=False))
    with pytest.raises(DataError) as info:
        run_cross_validation(opts)
    text = str(info.value)
    val_file = str(fold_paths(data, job_data.dataset_name, 0)["val"])
    assert val_file in text and "2 of" in text and "['cell_type', 'state']" in text
    assert not (tmp_path / "out" / "full_finetune" / job_data.dataset_name / "0").exists()
    assert jf.run_finetune(mt_argv(job_data, data, tmp_path / "cli")) == 2


def test_attention_pooling_trains_its_own_weights(job_data, mt_data, tmp_path):
    argv = mt_argv(job_data, mt_data, tmp_path, "--prompt_type", "lora", "--pooling", "attention", "--epoch", "1",
                   "--baselines", "none")
    assert jf.run_finetune(argv) == 0
    fold = jf.run_dir(tmp_path, "lora", job_data) / "0"
    assert jf.read_json(fold / "config.json")["classifier_pooling"] == "attention"
    from safetensors import safe_open

    with safe_open(str(fold / "peft_model.safetensors"), framework="pt") as handle:
        assert "bert.pooler.attention.weight" in set(handle.keys())
    assert json.loads((fold / "provenance.json").read_text())["settings"]["options"]["pooling"] == "attention"


# ----------------------------------------------------------------------------- the shipped example


EXAMPLE_DATA = jf.ROOT / "example_py" / "data"


def test_the_example_runs_multitask_with_every_output(example_script, tmp_path):
    argv = ["--folds", "0", "--epoch", "2", "--output_path", str(tmp_path), "--no_progress", "--num_threads", "1",
            "--label_column", "cell_type,cell_state"]
    assert example_script.main(argv) == 0
    run = tmp_path / "Gene_token_prompt" / "synthetic"
    fold = run / "0"
    names = {p.name for p in fold.iterdir()}
    assert {"predictions.csv", "predictions.pickle", "metrics.json", "history.json", "config.json", "tokenizer.json",
            "peft_model.safetensors", "training_curves.png", "provenance.json", "fold_done.json",
            "confusion_matrix_cell_type.png", "confusion_matrix_cell_state.png", "baseline_metrics.json",
            "baseline_predictions.csv", "baseline_per_class_f1_cell_type.png",
            "baseline_per_class_f1_cell_state.png"} <= names
    metrics = jf.read_json(fold / "metrics.json")
    assert metrics["tasks"]["cell_state"]["labels"] == ["cycling", "quiescent"]
    assert metrics["tasks"]["cell_state"]["n_missing"] > 0 and metrics["tasks"]["cell_type"]["n_missing"] == 0
    assert set(jf.read_json(run / "summary.json")["tasks"]) == {"cell_type", "cell_state"}


def test_the_example_state_is_what_make_example_computes():
    """The shipped ``cell_state`` column is make_example.py's :func:`cell_states` of the example's
    cells (every cell is in one test split), and it cuts across the cell types."""
    import collections
    import importlib.util

    from geneformer_peft.data.dataset_io import load_saved_dataset
    from geneformer_peft.data.synthetic import generate_counts, generate_unlabelled_counts

    spec = importlib.util.spec_from_file_location("make_example", jf.ROOT / "example_py" / "make_example.py")
    make_example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(make_example)
    labelled = generate_counts(n_cells=500, seed=0, cell_seed=2)
    states = make_example.cell_states(generate_unlabelled_counts(n_cells=4000, seed=0, cell_seed=1), labelled)
    expected = collections.Counter(zip(labelled.obs["cell_type"].astype(str), states))
    for name in ("synthetic", "synthetic_binned", "synthetic_cellfm"):
        shipped = collections.Counter()
        for fold in range(5):
            test = load_saved_dataset(fold_paths(EXAMPLE_DATA, name, fold)["test"])
            shipped.update(zip(test["cell_type"], test["cell_state"]))
        assert shipped == expected, name
    for cell_type in set(labelled.obs["cell_type"].astype(str)):
        assert expected[(cell_type, "cycling")] > 0 and expected[(cell_type, "quiescent")] > 0


# ----------------------------------------------------------------------------- predict, embed, perturb, search


def test_predict_reads_a_multitask_fold_without_its_data(job_data, mt_data, mt_run, tmp_path):
    from geneformer_peft.cli import main

    fold = mt_run / "0"
    test = fold_paths(mt_data, job_data.dataset_name, 0)["test"]
    for name, extra in (("full", []), ("peft", ["--base_model", str(job_data.model_path)])):
        out = tmp_path / f"{name}.csv"
        assert main(["predict", "--model_path", str(fold), "--input", str(test), "--output", str(out), "--device",
                     "cpu", *extra]) == 0
        ours = pd.read_csv(out, keep_default_na=False)
        theirs = pd.read_csv(fold / "predictions.csv", keep_default_na=False)
        assert list(ours.columns) == list(theirs.columns)
        for column in ours.columns:
            if ours[column].dtype.kind == "f":
                np.testing.assert_allclose(ours[column], theirs[column], atol=1e-5)
            else:
                assert (ours[column] == theirs[column]).all(), column
    # without the state column: its truth is left out, its predictions stay; Unassigned per task
    from geneformer_peft.data.dataset_io import load_saved_dataset
    from geneformer_peft.evaluation.prediction import predict_cells

    frame, metrics = predict_cells(fold, load_saved_dataset(test).remove_columns([STATE]), device="cpu",
                                   unassign_threshold=0.99)
    assert "state_true" not in frame.columns and "state_pred" in frame.columns
    assert set(metrics["tasks"]) == {"cell_type"} and metrics["tasks_without_column"] == [STATE]
    assert (frame["state_pred"] == "Unassigned").sum() == (frame["state_confidence"] < 0.99).sum() > 0


def test_embed_gives_the_probability_readout_per_task(job_data, mt_data, mt_run, tmp_path):
    from geneformer_peft.cli import main

    fold = mt_run / "0"
    test = fold_paths(mt_data, job_data.dataset_name, 0)["test"]
    out = tmp_path / "emb.csv"
    assert main(["embed", "--model_path", str(fold), "--input", str(test), "--output", str(out), "--device", "cpu",
                 "--label_column", "cell_type", "--label_column", STATE, "--no_plots"]) == 0
    table = pd.read_csv(out, keep_default_na=False)
    predictions = pd.read_csv(fold / "predictions.csv", keep_default_na=False)
    for task in ("cell_type", STATE):
        assert (table[f"{task}_pred"] == predictions[f"{task}_pred"]).all()
        np.testing.assert_allclose(table[f"{task}_confidence"], predictions[f"{task}_confidence"], atol=1e-5)
    report = json.loads((tmp_path / "embedding_metrics.json").read_text())
    assert report["labels"][STATE]["n_classes"] == 2  # the cells without a state are no class


def test_perturbation_probabilities_are_per_task(job_data, mt_data, mt_run, tmp_path):
    from geneformer_peft.cli import main

    test = fold_paths(mt_data, job_data.dataset_name, 0)["test"]
    out = tmp_path / "perturb"
    assert main(["perturb", "--model_path", str(mt_run / "0"), "--input", str(test), "--output_dir", str(out),
                 "--perturb_type", "delete", "--genes", "all", "--max_ncells", "3", "--n_null", "1", "--device",
                 "cpu"]) == 0
    frame = pd.read_parquet(out / "perturbations.parquet")
    for task in ("cell_type", STATE):
        columns = [c for c in frame.columns if c.startswith(f"prob_delta_{task}:")]
        assert columns
        np.testing.assert_allclose(frame[columns].sum(axis=1), 0.0, atol=1e-5)  # a softmax per task


def test_search_tunes_a_multitask_model(job_data, mt_data, tmp_path):
    from geneformer_peft.cli import main

    space = tmp_path / "space.json"
    space.write_text(json.dumps({"lr": {"low": 1e-3, "high": 1e-2, "log": True}}))
    out = tmp_path / "search"
    argv = ["search", "--dataset_name", job_data.dataset_name, "--data_path", str(mt_data), "--model_path",
            str(job_data.model_path), "--prompt_type", "lora", "--space", str(space), "--output_dir", str(out),
            "--folds", "0", *jf.FAST_FLAGS, "--epoch", "1", "--n_trials", "2", "--label_column",
            f"cell_type,{STATE}", "--task_weights", "1,0.5", "--pooling", "mean"]
    assert main(argv) == 0
    best = json.loads((out / "best_flags.json").read_text())
    assert best["flags"]["--label_column"] == f"cell_type,{STATE}"
    assert best["flags"]["--task_weights"] == "1.0,0.5" and best["flags"]["--pooling"] == "mean"
    assert 0.0 <= best["validation_macro_f1"] <= 1.0


@pytest.mark.parametrize("dataset, checkpoint", [("synthetic_binned", "scbert-tiny-example"),
                                                 ("synthetic_cellfm", "cellfm-tiny-example")])
def test_every_family_trains_and_predicts_multitask(dataset, checkpoint, tmp_path):
    from geneformer_peft.cli import main

    model = jf.ROOT / "Pretrain_ckpts" / checkpoint
    argv = ["finetune", "--dataset_name", dataset, "--data_path", str(EXAMPLE_DATA), "--model_path", str(model),
            "--output_path", str(tmp_path), "--folds", "0", "--epoch", "1", "--no_progress", "--device", "cpu",
            "--num_threads", "1", "--baselines", "none", "--label_column", "cell_type,cell_state"]
    assert main(argv) == 0
    fold = tmp_path / "lora" / dataset / "0"
    metrics = jf.read_json(fold / "metrics.json")
    assert set(metrics["tasks"]) == {"cell_type", "cell_state"}
    out = tmp_path / "predicted.csv"
    test = fold_paths(EXAMPLE_DATA, dataset, 0)["test"]
    assert main(["predict", "--model_path", str(fold), "--input", str(test), "--output", str(out), "--device",
                 "cpu"]) == 0
    ours = pd.read_csv(out, keep_default_na=False)
    theirs = pd.read_csv(fold / "predictions.csv", keep_default_na=False)
    assert (ours["cell_state_pred"] == theirs["cell_state_pred"]).all()
    np.testing.assert_allclose(ours["cell_type_confidence"], theirs["cell_type_confidence"], atol=1e-5)
    assert main([*argv, "--pooling", "mean", "--output_path", str(tmp_path / "pooled")]) == 2  # BERT's pooler only


def test_the_api_takes_a_list_of_label_columns(job_data, mt_data, tmp_path):
    import geneformer_peft as gp

    result = gp.finetune(mt_data / job_data.dataset_name, model=job_data.model_path, method="lora", folds=[0],
                         epochs=1, lr=3e-3, batch_size=16, label_column=["cell_type", STATE], device="cpu",
                         output=tmp_path, progress=False, baselines="none", task_weights=[1.0, 2.0])
    assert set(result.summary_dict["tasks"]) == {"cell_type", STATE}
    assert result.fold(0).metrics["task_weights"] == {"cell_type": 1.0, STATE: 2.0}
    figure = result.plot_confusion_matrix(task=STATE)
    assert STATE in figure.axes[0].get_title()
    with pytest.raises(KeyError, match="its tasks are"):
        result.plot_confusion_matrix(task="disease")


def test_attention_pooling_weighs_real_tokens_only():
    from transformerslocal.modeling_bert import BertPooler

    torch.manual_seed(0)
    pooler = BertPooler(BertConfig(**TINY, classifier_pooling="attention"))
    hidden = torch.randn(2, 6, TINY["hidden_size"])
    mask = torch.tensor([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1]])
    changed = hidden.clone()
    changed[0, 4:] = 100.0  # padding: no weight whatever its states
    torch.testing.assert_close(pooler(hidden, mask)[0], pooler(changed, mask)[0])
    scores = pooler.attention(hidden[0, :4]).squeeze(-1).softmax(dim=0)
    expected = torch.tanh(pooler.dense((scores[:, None] * hidden[0, :4]).sum(dim=0)))
    torch.testing.assert_close(pooler(hidden, mask)[0], expected)
    assert not pooler.reads_token_0_only


def test_a_run_recorded_before_the_multitask_options_still_matches():
    """Folds finished before --task_weights and --pooling existed are neither refused nor redone."""
    from geneformer_peft.training.provenance import compare_settings

    before = {"options": {"label_column": "cell_type", "baselines": "logreg"}}
    now = {"options": {"label_column": "cell_type", "baselines": "logreg", "task_weights": None, "pooling": None}}
    assert compare_settings(before, now) == []
    changed = {"options": {**now["options"], "pooling": "mean"}}
    assert compare_settings(before, changed) == [("options.pooling", "<not recorded>", "mean")]
