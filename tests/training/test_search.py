"""Hyperparameter search (issue 15): a 3-trial search writes every output and refits, an
interrupted search resumes with the trial numbers continuing, two processes share one study,
the test split is never read while searching, and a bad space file names key and value.
Issues 22 and 25: a study refuses trials or a refit under other settings than it recorded,
best_command.txt reproduces the best trial's value, Ctrl-C is one line, and every trial runs
with the thread count of the job's policy."""
from __future__ import annotations

import dataclasses
import json
import logging
import shlex
import shutil
import signal
import subprocess
import sys
import time

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


# ----------------------------------------------------------------------------- issue 22: settings, best command, Ctrl-C
def test_best_command_reproduces_the_best_trial(job_data, tmp_path, space_file):
    """best_command.txt names every setting the trial was measured with (a non-default epoch
    rule, patience and seed included): parsed, it gives the trial's training settings, and run,
    the trial's validation macro-F1 to the last bit."""
    from geneformer_peft.commands import finetune
    from geneformer_peft.models.loading import resolve_config
    from geneformer_peft.training import provenance, search

    out = tmp_path / "search"
    argv = _search_argv(job_data, out, space_file, "--n_trials", "2", "--epoch", "3", "--select_epoch_by", "loss",
                        "--early_stopping_patience", "1", "--seed", "3", "--no_pruning")
    assert cli.main(argv) == 0
    best = json.loads((out / "best_flags.json").read_text())
    lines = (out / "best_command.txt").read_text().splitlines()
    assert lines[0].startswith(f"# trial {best['trial']}: validation macro-F1 {best['validation_macro_f1']!r}")
    command = shlex.split(lines[1])
    assert command[:2] == ["geneformer-peft", "finetune"]
    parser = cli.build_parser()
    searched = finetune.options_from_args(parser.parse_args(argv))
    trial = search.trial_options(searched, best["params"])
    given = finetune.options_from_args(parser.parse_args(command[1:]))
    assert provenance.option_settings(given.training) == provenance.option_settings(trial.training)
    assert (given.folds, given.num_threads, given.label_column, given.training.device) == ([0], 1, "cell_type", "cpu")
    expected = resolve_config(job_data.model_path, prompt_type="lora", overrides=trial.config_overrides).to_dict()
    assert resolve_config(given.model_path, config_path=given.config_path).to_dict() == expected
    # run as a user would paste it: the same value
    assert cli.main([*command[1:], "--output_path", str(tmp_path / "best"), "--baselines", "none"]) == 0
    metrics = jf.read_json(jf.run_dir(tmp_path / "best", "lora", job_data) / "0" / "metrics.json")
    assert metrics["best_val_macro_f1"] == best["validation_macro_f1"]


def _copy_inputs(job_data, root):
    shutil.copytree(job_data.data_path, root / "folds")
    shutil.copytree(job_data.model_path, root / "ckpt")
    return dataclasses.replace(job_data, data_path=root / "folds", model_path=root / "ckpt")


def _errors(caplog) -> str:
    return "\n".join(r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR)


def test_study_refuses_trials_and_refit_under_other_settings(job_data, tmp_path, space_file, caplog):
    data = _copy_inputs(job_data, tmp_path)
    out = tmp_path / "search"
    assert cli.main(_search_argv(data, out, space_file, "--n_trials", "1")) == 0
    settings = search_settings(out)
    assert settings["training"]["epochs"] == 1 and settings["folds"] == [0] and "lr" not in settings["training"]
    assert settings["space"]["lr"]["high"] == SPACE["lr"]["high"] and "0" in settings["data"]
    wider = tmp_path / "wider.json"
    wider.write_text(json.dumps({**SPACE, "lr": {"low": 1e-3, "high": 5e-2, "log": True}}))
    with caplog.at_level(logging.ERROR):
        assert cli.main(_search_argv(data, out, wider, "--n_trials", "1", "--epoch", "2",
                                     "--select_epoch_by", "loss")) == 2
    message = _errors(caplog)
    assert f"study 'search' in {out / 'study.db'}" in message and "--output_dir" in message, message
    for line in ("training.epochs: 1 (recorded) -> 2 (now)", "space.lr.high: 0.01 (recorded) -> 0.05 (now)",
                 "training.select_epoch_by: 'macro_f1' (recorded) -> 'loss' (now)"):
        assert line in message, message
    caplog.clear()
    with caplog.at_level(logging.ERROR):  # the best setting is not refitted under other settings either
        assert cli.main(_search_argv(data, out, space_file, "--n_trials", "0", "--refit", "--epoch", "2")) == 2
    message = _errors(caplog)
    assert "refusing to refit its best trial" in message and "training.epochs: 1 (recorded) -> 2 (now)" in message
    assert not (out / "refit").exists() and len(_trials(out)) == 1
    # what does not change a trial's value may change
    assert cli.main(_search_argv(data, out, space_file, "--n_trials", "1", "--num_threads", "1",
                                 "--pruner_startup_trials", "3", "--overwrite")) == 0
    assert len(_trials(out)) == 2
    # the checkpoint's weights and the data's labels are fingerprinted
    weights = next(data.model_path.glob("model.safetensors"))
    weights.write_bytes(weights.read_bytes()[:-8] + bytes(8))
    caplog.clear()
    with caplog.at_level(logging.ERROR):
        assert cli.main(_search_argv(data, out, space_file, "--n_trials", "1")) == 2
    assert "checkpoint.files.model.safetensors.sha256" in _errors(caplog)

    def relabel(columns):
        columns["cell_type"] = list(reversed(columns["cell_type"]))

    jf.rewrite_split(data, 0, "val", relabel)
    caplog.clear()
    with caplog.at_level(logging.ERROR):
        assert cli.main(_search_argv(data, out, space_file, "--n_trials", "1")) == 2
    assert "data.0.val.label_sha256" in _errors(caplog)
    assert len(_trials(out)) == 2


def search_settings(out) -> dict:
    import optuna

    return optuna.load_study(study_name="search", storage=f"sqlite:///{out / 'study.db'}").user_attrs["settings"]


def test_ctrl_c_in_search_is_one_line_exit_130_and_the_study_resumes(job_data, tmp_path, space_file, monkeypatch):
    from geneformer_peft.training import search

    out = tmp_path / "search"
    argv = _search_argv(job_data, out, space_file, "--n_trials", "2", "--epoch", "1000",
                        "--early_stopping_patience", "0", "--no_pruning")
    log = out / "search.log"
    # SIG_DFL in the child: a shell without job control starts background jobs with SIGINT ignored
    proc = subprocess.Popen([sys.executable, "-m", "geneformer_peft.cli", *argv], cwd=jf.ROOT,
                            env=jf._subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        deadline = time.monotonic() + 200
        while not (log.is_file() and "fold 0 epoch 1:" in log.read_text()) and proc.poll() is None:
            assert time.monotonic() < deadline, "trial 0 never trained an epoch"
            time.sleep(0.1)
        assert proc.poll() is None, "the search ended before it could be interrupted"
        proc.send_signal(signal.SIGINT)
        _, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, stderr[-3000:]
    for noise in ("Traceback", "KeyboardInterrupt", "Trial 0 failed"):
        assert noise not in stderr, stderr[-3000:]
    interrupted = [line for line in stderr.splitlines() if "interrupted" in line]
    assert len(interrupted) == 1 and interrupted[0] == stderr.strip().splitlines()[-1], stderr[-3000:]
    assert "search interrupted during trial 0 (recorded as failed)" in interrupted[0]
    assert "rerun the same command" in interrupted[0]
    assert "run stopped: search interrupted during trial 0" in log.read_text().strip().splitlines()[-1]
    assert list(_trials(out)["state"]) == ["FAIL"]
    # the same command adds trials after the failed one (their training replaced by a stand-in)
    monkeypatch.setattr(search, "evaluate_setting",
                        lambda *args, **kwargs: {"value": 0.5, "fold_val_macro_f1": [0.5], "epochs_run": [1]})
    assert cli.main(argv) == 0
    trials = _trials(out)
    assert list(trials["number"]) == [0, 1, 2] and list(trials["state"]) == ["FAIL", "COMPLETE", "COMPLETE"]


def test_a_data_error_inside_a_trial_is_one_line_without_optunas_traceback(job_data, tmp_path, space_file,
                                                                            monkeypatch, caplog):
    from geneformer_peft.errors import DataError
    from geneformer_peft.training import search

    def bad_cells(*args, **kwargs):
        raise DataError("fold 0 train split x.dataset: holds token id 9999, but the model has vocab_size 202")

    monkeypatch.setattr(search, "evaluate_setting", bad_cells)
    out = tmp_path / "search"
    with caplog.at_level(logging.DEBUG):
        assert cli.main(_search_argv(job_data, out, space_file, "--n_trials", "2")) == 2
    assert not [r for r in caplog.records if r.name.startswith("optuna") and (r.exc_info or "failed" in r.getMessage())]
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR] == [
        "fold 0 train split x.dataset: holds token id 9999, but the model has vocab_size 202"]
    assert list(_trials(out)["state"]) == ["FAIL"]


# ----------------------------------------------------------------------------- issue 25: thread policy
def test_every_trial_runs_with_the_thread_count_of_the_jobs_policy(job_data, tmp_path, space_file, monkeypatch):
    import torch

    from geneformer_peft.training import search, threads

    seen = []
    real = search.evaluate_setting

    def spy(*args, **kwargs):
        seen.append(torch.get_num_threads())
        return real(*args, **kwargs)

    monkeypatch.setattr(search, "evaluate_setting", spy)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        # --num_threads wins
        assert cli.main(_search_argv(job_data, tmp_path / "fixed", space_file, "--n_trials", "2",
                                     "--num_threads", "1")) == 0
        assert seen == [1, 1]
        # otherwise the policy chooses for each trial, at most torch's count at the start
        asked = []

        def policy(requested=None, *, current=None, environ=None):
            asked.append((requested, current))
            return threads.ThreadChoice(1, "cores free (test)")

        monkeypatch.setattr(threads, "choose_num_threads", policy)
        out = tmp_path / "policy"
        assert cli.main(_search_argv(job_data, out, space_file, "--n_trials", "2")) == 0
        assert asked == [(None, 2), (None, 2)] and seen[2:] == [1, 1]
        assert torch.get_num_threads() == 2, "the search gives torch its thread count back"
    finally:
        torch.set_num_threads(before)
    assert "trial 1: torch threads: 1 (cores free (test))" in (out / "search.log").read_text()
    assert list(_trials(out)["user_attrs_torch_threads"]) == [1, 1]
    assert "--num_threads 1" in (out / "best_command.txt").read_text()


def test_trials_record_their_training_speed_as_finetune_does(job_data, tmp_path, space_file, monkeypatch):
    """Each trial records its training passes' seconds and cells/s (validation excluded), the
    trainer's own figures, as finetune's metrics.json reports them (bench_search_speed.py)."""
    from geneformer_peft.training import trainer

    fits = []
    real_fit = trainer.FoldTrainer.fit

    def recording_fit(self, *args, **kwargs):
        fits.append(real_fit(self, *args, **kwargs))
        return fits[-1]

    monkeypatch.setattr(trainer.FoldTrainer, "fit", recording_fit)
    out = tmp_path / "search"
    assert cli.main(_search_argv(job_data, out, space_file, "--n_trials", "2", "--no_pruning", "--folds", "0,1")) == 0
    trials = _trials(out)
    assert len(fits) == 4
    for number, pair in enumerate((fits[:2], fits[2:])):
        seconds = sum(f.train_seconds for f in pair)
        assert trials.loc[number, "user_attrs_train_seconds"] == pytest.approx(seconds)
        assert trials.loc[number, "user_attrs_train_cells_per_second"] == pytest.approx(
            sum(f.train_cells for f in pair) / seconds)
        assert 0 < seconds < trials.loc[number, "seconds"]
