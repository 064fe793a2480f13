"""Resuming an interrupted run, skipping finished folds, --overwrite, and determinism."""
from __future__ import annotations

import logging

import pytest

import job_factories as jf
from geneformer_peft.training import trainer as trainer_module


class Interrupted(Exception):
    """Stands for a killed process (raised right after an epoch checkpoint was written)."""


def _metrics(run, fold):
    return jf.result_metrics(jf.read_json(run / str(fold) / "metrics.json"))


def test_same_seed_gives_identical_metrics(job_data, tmp_path):
    runs = []
    for name in ("a", "b"):
        assert jf.run_finetune(job_data.finetune_argv(tmp_path / name, "--prompt_type", "lora", "--folds", "0")) == 0
        runs.append(jf.run_dir(tmp_path / name, "lora", job_data))
    assert _metrics(runs[0], 0) == _metrics(runs[1], 0)
    assert (runs[0] / "0" / "predictions.csv").read_text() == (runs[1] / "0" / "predictions.csv").read_text()


def test_interrupted_fold_resumes_and_finished_folds_are_skipped(job_data, tmp_path, monkeypatch, caplog):
    argv = ["--prompt_type", "Gene_token_prompt", "--epoch", "3", "--early_stopping_patience", "0"]
    reference = jf.run_dir(tmp_path / "reference", "Gene_token_prompt", job_data)
    assert jf.run_finetune(job_data.finetune_argv(tmp_path / "reference", *argv)) == 0

    # Interrupt fold 1 right after its epoch-2 checkpoint; fold 0 finishes first.
    original = trainer_module.FoldTrainer._save_checkpoint

    def save_then_die(self, epoch, state):
        original(self, epoch, state)
        if self.desc == "fold 1" and epoch == 2:
            raise Interrupted("killed after epoch 2")

    monkeypatch.setattr(trainer_module.FoldTrainer, "_save_checkpoint", save_then_die)
    output = tmp_path / "interrupted"
    run = jf.run_dir(output, "Gene_token_prompt", job_data)
    with pytest.raises(Interrupted):
        jf.run_finetune(job_data.finetune_argv(output, *argv))
    monkeypatch.undo()
    checkpoint = run / ".resume" / "1" / trainer_module.CHECKPOINT_NAME
    assert checkpoint.is_file()
    assert (run / "0" / "fold_done.json").is_file() and not (run / "1").exists()
    mtimes = {p.name: p.stat().st_mtime_ns for p in (run / "0").iterdir()}

    caplog.clear()
    with caplog.at_level(logging.INFO):
        assert jf.run_finetune(job_data.finetune_argv(output, *argv)) == 0
    log = caplog.text
    assert "fold 0: finished earlier, skipped" in log
    assert "resuming after epoch 2" in log and str(checkpoint) in log
    assert "fold 1 epoch 1:" not in log and "fold 1 epoch 3:" in log
    assert {p.name: p.stat().st_mtime_ns for p in (run / "0").iterdir()} == mtimes
    assert not checkpoint.exists()
    for fold in (0, 1):
        assert _metrics(run, fold) == _metrics(reference, fold)
    history = jf.read_json(run / "1" / "history.json")
    assert [h["epoch"] for h in history] == [1, 2, 3]

    # --overwrite redoes finished folds (and, being deterministic, gets the same results).
    assert jf.run_finetune(job_data.finetune_argv(output, *argv, "--overwrite", "--folds", "0")) == 0
    assert (run / "0" / "metrics.json").stat().st_mtime_ns != mtimes["metrics.json"]
    assert _metrics(run, 0) == _metrics(reference, 0)


def test_unfinished_fold_folder_is_an_error(job_data, tmp_path, example_script, caplog):
    run = jf.run_dir(tmp_path, "lora", job_data)
    (run / "0").mkdir(parents=True)
    (run / "0" / "stray.txt").write_text("left by a crashed copy")
    with caplog.at_level(logging.ERROR):
        assert example_script.main(job_data.finetune_argv(tmp_path, "--prompt_type", "lora", "--folds", "0")) != 0
    assert str(run / "0") in caplog.text and "--overwrite" in caplog.text
