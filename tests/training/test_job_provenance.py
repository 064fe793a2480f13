"""Provenance: every fold folder records the settings, data and checkpoint that made it;
reruns and resumes with other settings are refused; the summary carries the folds' own settings."""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import shutil

import job_factories as jf
import pytest

from geneformer_peft.training import provenance as prov
from geneformer_peft.training import trainer as trainer_module

ARGV = ("--prompt_type", "lora", "--folds", "0")


class Interrupted(Exception):
    """Stands for a killed process (raised right after an epoch checkpoint was written)."""


@pytest.fixture(scope="module")
def finished(job_data, tmp_path_factory):
    """Output folder of a finished one-fold LoRA run."""
    output = tmp_path_factory.mktemp("provenance")
    assert jf.run_finetune(job_data.finetune_argv(output, *ARGV)) == 0
    return output


def _rerun(job_data, output, caplog, *extra) -> tuple[int, str]:
    caplog.clear()
    with caplog.at_level(logging.INFO):
        status = jf.run_finetune(job_data.finetune_argv(output, *ARGV, *extra))
    return status, caplog.text


def test_fold_folder_records_settings_data_and_checkpoint(finished, job_data):
    run = jf.run_dir(finished, "lora", job_data)
    record = jf.read_json(run / "0" / prov.PROVENANCE_FILE)
    assert prov.PROVENANCE_FILE in jf.read_json(run / "0" / "fold_done.json")["files"]
    settings = record["settings"]
    assert settings["training"]["lr"] == 3e-3 and settings["training"]["seed"] == 0 and settings["fold_seed"] == 0
    assert settings["options"]["label_column"] == "cell_type" and settings["options"]["prompt_type"] == "lora"
    assert "output_path" not in settings["options"] and "progress" not in settings["training"]
    saved = jf.read_json(run / "0" / "config.json")  # the fold's resolved config
    for key in ("prompt_type", "lora_r", "label2id", "vocab_size", "finetune_max_length"):
        assert settings["config"][key] == saved[key], key
    weights = next(p for p in job_data.model_path.iterdir() if p.suffix in (".safetensors", ".bin"))
    assert settings["checkpoint"]["files"][weights.name] == {
        "size": weights.stat().st_size, "sha256": hashlib.sha256(weights.read_bytes()).hexdigest()}
    test = settings["data"]["test"]
    labels = __import__("datasets").load_from_disk(str(job_data.fold_file(0, "test")))["cell_type"]
    assert test["path"] == str(job_data.fold_file(0, "test").resolve())
    assert test["n_cells"] == len(labels)
    assert test["label_sha256"] == hashlib.sha256("\n".join(map(str, labels)).encode()).hexdigest()
    assert record["environment"]["versions"]["torch"]
    # the summary's settings are the fold's recorded ones
    summary = jf.read_json(run / "summary.json")
    assert summary["settings"]["training"] == settings["training"]
    assert summary["settings_differ_between_folds"] == {} and summary["folds_without_provenance"] == []
    assert "torch threads: 1 (" in (run / "run.log").read_text()


def test_unchanged_rerun_skips(finished, job_data, caplog):
    run = jf.run_dir(finished, "lora", job_data)
    before = (run / "0" / "metrics.json").stat().st_mtime_ns
    status, log = _rerun(job_data, finished, caplog, "--num_threads", "1", "--num_workers", "0")
    assert status == 0 and "fold 0: finished earlier, skipped" in log
    assert (run / "0" / "metrics.json").stat().st_mtime_ns == before


@pytest.mark.parametrize("flag, value, key, old, new", [
    ("--lr", "1e-3", "training.lr", "0.003", "0.001"),
    ("--seed", "7", "training.seed", "0", "7"),
])
def test_rerun_with_a_changed_setting_is_refused(flag, value, key, old, new, finished, job_data, caplog):
    run = jf.run_dir(finished, "lora", job_data)
    before = {p.name: p.stat().st_mtime_ns for p in (run / "0").iterdir()}
    summary_before = (run / "summary.json").read_text()
    status, _ = _rerun(job_data, finished, caplog, flag, value)
    assert status == 2
    message = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR][-1]
    assert f"{key}: {old} (recorded) -> {new} (now)" in message
    assert "--overwrite" in message and "--output_path" in message and "--out_prefix" in message
    assert {p.name: p.stat().st_mtime_ns for p in (run / "0").iterdir()} == before
    assert (run / "summary.json").read_text() == summary_before
    run_log = (run / "run.log").read_text()
    last = run_log[run_log.rindex(" ERROR "):]  # the error that ended the run is the last record
    assert " INFO " not in last and "run stopped:" in last and f"{key}: {old} (recorded)" in last


def test_rerun_with_another_config_is_refused(finished, job_data, tmp_path, caplog):
    config = jf.read_json(job_data.model_path / "config.json")
    config.update(prompt_type="lora", lora_r=4)
    (tmp_path / "config.json").write_text(json.dumps(config))
    status, _ = _rerun(job_data, finished, caplog, "--config", str(tmp_path / "config.json"))
    assert status == 2
    message = caplog.records[-1].getMessage()
    assert "options.config_path: null (recorded) ->" in message and str(tmp_path / "config.json") in message
    assert "config.lora_r:" in message


def test_overwrite_redoes_with_the_new_settings(finished, job_data, tmp_path, caplog):
    output = tmp_path / "copy"
    shutil.copytree(finished, output)
    status, log = _rerun(job_data, output, caplog, "--lr", "1e-3", "--overwrite")
    assert status == 0 and "finished earlier" not in log
    run = jf.run_dir(output, "lora", job_data)
    assert jf.read_json(run / "0" / prov.PROVENANCE_FILE)["settings"]["training"]["lr"] == 1e-3
    assert jf.read_json(run / "summary.json")["settings"]["training"]["lr"] == 1e-3


def test_resume_with_a_changed_setting_is_refused(job_data, tmp_path, monkeypatch, caplog):
    original = trainer_module.FoldTrainer._save_checkpoint

    def save_then_die(self, epoch, state):
        original(self, epoch, state)
        if epoch == 1:
            raise Interrupted("killed after epoch 1")

    monkeypatch.setattr(trainer_module.FoldTrainer, "_save_checkpoint", save_then_die)
    with pytest.raises(Interrupted):
        jf.run_finetune(job_data.finetune_argv(tmp_path, *ARGV))
    monkeypatch.undo()
    run = jf.run_dir(tmp_path, "lora", job_data)
    checkpoint = run / ".resume" / "0" / trainer_module.CHECKPOINT_NAME
    assert checkpoint.is_file() and (checkpoint.parent / prov.PROVENANCE_FILE).is_file()

    status, _ = _rerun(job_data, tmp_path, caplog, "--lr", "1e-4", "--seed", "5")
    assert status == 2
    message = caplog.records[-1].getMessage()
    assert "interrupted" in message and str(checkpoint.parent) in message
    assert "training.lr: 0.003 (recorded) -> 0.0001 (now)" in message and "training.seed: 0 (recorded) -> 5" in message
    assert checkpoint.is_file(), "a refused resume keeps the checkpoint"

    # --overwrite with the new settings trains the fold from its first epoch
    status, log = _rerun(job_data, tmp_path, caplog, "--lr", "1e-4", "--seed", "5", "--overwrite")
    assert status == 0 and "training it from the start" in log and "resuming" not in log
    history = jf.read_json(run / "0" / "history.json")
    assert [h["epoch"] for h in history] == [1, 2]
    assert jf.read_json(run / "0" / prov.PROVENANCE_FILE)["settings"]["training"]["seed"] == 5


def test_settings_are_every_field_of_the_options(job_data):
    """A field added to RunOptions or TrainingArguments is recorded without touching provenance.py."""
    from geneformer_peft.training.arguments import TrainingArguments
    from geneformer_peft.training.cross_validation import RunOptions

    Extended = dataclasses.make_dataclass("Extended", [("baselines", str, "logreg")], bases=(RunOptions,))
    opts = Extended(dataset_name="d", data_path=job_data.data_path, output_path=job_data.data_path,
                    model_path=job_data.model_path, training=TrainingArguments(lr=0.5))
    settings = prov.option_settings(opts)
    assert settings["baselines"] == "logreg" and settings["training"]["lr"] == 0.5
    expected = {f.name for f in dataclasses.fields(Extended)} - prov.NOT_RESULT_FIELDS
    assert set(settings) == expected
    assert set(settings["training"]) == {f.name for f in dataclasses.fields(TrainingArguments)} - prov.NOT_RESULT_FIELDS
    assert settings["data_path"] == str(job_data.data_path.resolve())


def test_summary_says_when_folds_differ():
    def record(lr, data):
        return {"settings": {"training": {"lr": lr, "epochs": 2}, "fold_seed": 0, "data": data}}

    out = prov.summary_settings({0: record(0.01, "a"), 1: record(0.001, "b"), 2: None})
    assert out["settings"] == {"training": {"epochs": 2}}
    assert out["settings_differ_between_folds"] == {"training.lr": {"0": 0.01, "1": 0.001}}
    assert out["folds_without_provenance"] == [2]
    assert out["fold_data"]["1"]["data"] == "b"


def test_file_hashes_are_cached_by_path_size_and_mtime(tmp_path):
    file = tmp_path / "weights.bin"
    file.write_bytes(b"abc")
    cache = prov.FileHashCache(tmp_path / "cache.json")
    assert cache.sha256(file) == hashlib.sha256(b"abc").hexdigest()
    cache.save()
    entry = jf.read_json(tmp_path / "cache.json")[str(file.resolve())]
    entry["sha256"] = "cached"
    (tmp_path / "cache.json").write_text(json.dumps({str(file.resolve()): entry}))
    assert prov.FileHashCache(tmp_path / "cache.json").sha256(file) == "cached"  # not read again
    file.write_bytes(b"abcd")  # size (and mtime) changed: hashed again
    assert prov.FileHashCache(tmp_path / "cache.json").sha256(file) == hashlib.sha256(b"abcd").hexdigest()
