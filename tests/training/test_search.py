"""Hyperparameter search (issue 15): a 3-trial search writes every output and refits, an
interrupted search resumes with the trial numbers continuing, two processes share one study,
the test split is never read while searching, and a bad space file names key and value."""
from __future__ import annotations

import json
import logging
import shutil
import subprocess
import sys

import pandas as pd
import pytest

import job_factories as jf
from geneformer_peft import cli

SPACE = {"lr": {"low": 1e-3, "high": 1e-2, "log": True}, "layer_decay": {"low": 0.6, "high": 1.0},
         "lora_r": {"choices": [2, 4]}, "lr_schedule": ["linear", "cosine"]}


def _search_argv(job_data, out, space_path, *extra, data_path=None):
    return ["search", "--dataset_name", job_data.dataset_name, "--data_path", str(data_path or job_data.data_path),
            "--model_path", str(job_data.model_path), "--prompt_type", "lora", "--space", str(space_path),
            "--output_dir", str(out), "--folds", "0", *jf.FAST_FLAGS, "--epoch", "1", *extra]


@pytest.fixture()
def space_file(tmp_path):
    path = tmp_path / "space.json"
    path.write_text(json.dumps(SPACE))
    return path


def _trials(out) -> pd.DataFrame:
    return pd.read_csv(out / "trials.csv")


def test_three_trial_search_writes_all_outputs_and_refits(job_data, tmp_path, space_file):
    out = tmp_path / "search"
    assert cli.main(_search_argv(job_data, out, space_file, "--n_trials", "3", "--epoch", "2", "--refit")) == 0
    trials = _trials(out)
    assert list(trials["number"]) == [0, 1, 2]
    assert {"value", "state", "datetime_start", "seconds", "params_lr", "params_layer_decay", "params_lora_r",
            "params_lr_schedule"} <= set(trials.columns)
    assert set(trials["state"]) <= {"COMPLETE", "PRUNED"} and (trials["state"] == "COMPLETE").sum() >= 2
    for name in ("study.db", "search.log", "best_config.json", "best_flags.json", "best_command.txt",
                 "optimization_history.png", "param_importances.png"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    best = json.loads((out / "best_flags.json").read_text())
    completed = trials[trials["state"] == "COMPLETE"]
    assert best["validation_macro_f1"] == pytest.approx(completed["value"].max())
    assert best["params"]["lora_r"] in (2, 4) and best["flags"]["--lr"] == pytest.approx(best["params"]["lr"])
    # best_config.json is a config the job takes as --config, with the best PEFT keys
    from geneformer_peft.models.loading import resolve_config

    config = resolve_config(job_data.model_path, config_path=out / "best_config.json")
    assert config.prompt_type == "lora" and config.lora_r == best["params"]["lora_r"]
    command = (out / "best_command.txt").read_text()
    assert "--config" in command and f"--layer_decay {best['flags']['--layer_decay']}" in command
    # --refit: the best setting on all folds, test metrics once
    refit = json.loads((out / "refit_summary.json").read_text())
    assert refit["trial"] == best["trial"] and refit["fold_ids"] == list(range(job_data.n_folds))
    assert 0.0 <= refit["test"]["macro_f1"]["mean"] <= 1.0
    summary = json.loads((out / "refit" / "lora" / job_data.dataset_name / "summary.json").read_text())
    assert summary["settings"]["training"]["lr"] == pytest.approx(best["params"]["lr"])
    assert summary["settings"]["training"]["layer_decay"] == pytest.approx(best["params"]["layer_decay"])


def test_interrupted_search_resumes_with_the_trial_count_continuing(job_data, tmp_path, space_file, monkeypatch):
    from geneformer_peft.training import search

    out = tmp_path / "search"
    real = search.evaluate_setting
    calls = []

    def interrupted(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(search, "evaluate_setting", interrupted)
    assert cli.main(_search_argv(job_data, out, space_file, "--n_trials", "3", "--no_pruning")) == 130
    first = _trials(out)
    assert list(first["number"]) == [0, 1] and list(first["state"]) == ["COMPLETE", "FAIL"]
    monkeypatch.setattr(search, "evaluate_setting", real)
    assert cli.main(_search_argv(job_data, out, space_file, "--n_trials", "2", "--no_pruning")) == 0
    trials = _trials(out)
    assert list(trials["number"]) == [0, 1, 2, 3]
    assert list(trials["state"]) == ["COMPLETE", "FAIL", "COMPLETE", "COMPLETE"]
    assert trials.loc[0, "params_lr"] == first.loc[0, "params_lr"]  # the first trial kept as it was
    # resumed draws differ from the first ones (the sampler does not replay them)
    assert trials.loc[2, "params_lr"] != trials.loc[0, "params_lr"]


def test_two_processes_share_the_study(job_data, tmp_path, space_file):
    out = tmp_path / "search"
    cmd = [sys.executable, "-m", "geneformer_peft.cli", *_search_argv(job_data, out, space_file, "--n_trials", "1")]
    out.mkdir()
    procs = [subprocess.Popen(cmd, cwd=jf.ROOT, env=jf._subprocess_env(), stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]
    for proc in procs:
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err[-3000:]
    trials = _trials(out)
    assert sorted(trials["number"]) == [0, 1] and list(trials["state"]) == ["COMPLETE", "COMPLETE"]


def test_the_test_split_is_never_read_during_search(job_data, tmp_path, space_file, monkeypatch):
    """The test split files are removed and every dataset load is recorded: the search runs
    and never asks for a test file."""
    data = tmp_path / "folds"
    shutil.copytree(job_data.data_path, data)
    for fold in range(job_data.n_folds):
        shutil.rmtree(data / job_data.dataset_name / str(fold) / f"{job_data.dataset_name}_test{fold}.dataset")
    from geneformer_peft.data import dataset_io
    from geneformer_peft.training import search

    opened = []
    real_load = dataset_io.load_saved_dataset

    def spy(path, *args, **kwargs):
        opened.append(str(path))
        return real_load(path, *args, **kwargs)

    monkeypatch.setattr(search, "load_saved_dataset", spy)
    argv = _search_argv(job_data, tmp_path / "search", space_file, "--n_trials", "2", "--folds", "0,1",
                        data_path=data)
    assert cli.main(argv) == 0
    assert (_trials(tmp_path / "search")["state"] == "COMPLETE").sum() >= 1
    assert opened and not any("_test" in p.rsplit("/", 1)[1] for p in opened), opened
    assert {p.rsplit("/", 1)[1] for p in opened} == {f"{job_data.dataset_name}_{s}{f}.dataset"
                                                     for s in ("train", "val") for f in (0, 1)}


@pytest.mark.parametrize("space, named", [
    ({"learning_rate": {"low": 1e-4, "high": 1e-2}}, ["parameter", '"learning_rate"']),
    ({"lr": {"low": -1e-3, "high": 1e-2, "log": True}}, ["lr.low", "-0.001"]),
    ({"layer_decay": {"low": 0.5, "high": 1.5}}, ["layer_decay", "1.5"]),
    ({"lr_schedule": {"choices": ["linear", "steps"]}}, ["lr_schedule", '"steps"']),
    ({"lr": {"low": 1e-2, "high": 1e-4}}, ["lr.low", "0.01"]),
    ({"lora_r": {"low": 2.5, "high": 8}}, ["lora_r.low", "2.5"]),
    ({"batch_size": {"low": 8, "high": 32, "spread": 2}}, ["batch_size.spread", "2"]),
])
def test_bad_search_space_names_key_and_value(job_data, tmp_path, space, named, caplog):
    path = tmp_path / "space.json"
    path.write_text(json.dumps(space))
    with caplog.at_level(logging.ERROR):
        assert cli.main(_search_argv(job_data, tmp_path / "s", path, "--n_trials", "1")) == 2
    message = " ".join(r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR)
    assert str(path) in message and all(n in message for n in named), message
    assert not (tmp_path / "s" / "study.db").exists()


def test_search_missing_input_exits_2_naming_the_path(job_data, tmp_path, space_file, caplog):
    missing = tmp_path / "does_not_exist"
    with caplog.at_level(logging.ERROR):
        assert cli.main(_search_argv(job_data, tmp_path / "s", space_file, data_path=missing)) == 2
        assert cli.main(_search_argv(job_data, tmp_path / "s", missing)) == 2
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert sum(str(missing) in m for m in errors) == 2, errors
