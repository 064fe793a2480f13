"""Inputs that used to end in a traceback: each is now a one-line error with exit 2 (130 for
Ctrl-C) naming the file or value, found before any fold trains, with finished folds kept."""
from __future__ import annotations

import logging
import os
import shutil
import signal
import subprocess
import sys
import time

import job_factories as jf
import pytest


def _errors(caplog) -> str:
    return "\n".join(r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR)


def _last_record(run_log: str) -> str:
    return run_log[run_log.rindex(" ERROR "):]


@pytest.mark.parametrize("weights, safe", [("model.safetensors", True), ("pytorch_model.bin", False)])
def test_truncated_weight_file_names_the_file(weights, safe, job_data, tmp_path, caplog):
    from transformerslocal import BertForMaskedLM

    ckpt = tmp_path / "ckpt"
    BertForMaskedLM.from_pretrained(job_data.model_path).save_pretrained(ckpt, safe_serialization=safe)
    file = ckpt / weights
    assert file.is_file()
    file.write_bytes(file.read_bytes()[: file.stat().st_size // 2])
    argv = job_data.finetune_argv(tmp_path / "out", "--prompt_type", "lora", "--folds", "0")
    argv[argv.index("--model_path") + 1] = str(ckpt)
    with caplog.at_level(logging.ERROR):
        assert jf.run_finetune(argv) == 2
    message = caplog.records[-1].getMessage()
    assert str(file) in message and "truncated or not a checkpoint" in message
    assert not (jf.run_dir(tmp_path / "out", "lora", job_data) / "0").exists()


def test_bad_data_in_the_last_fold_is_reported_before_the_first_trains(job_data, tmp_path, caplog):
    data = jf.copy_job_data(job_data, tmp_path)

    def negative_id(columns):
        columns["input_ids"][0][3] = -1

    def cell_without_genes(columns):
        columns["input_ids"][1] = []

    def id_above_vocabulary(columns):
        columns["input_ids"][0][0] = 10_000

    jf.rewrite_split(data, 1, "test", negative_id)
    jf.rewrite_split(data, 1, "val", cell_without_genes)
    jf.rewrite_split(data, 1, "train", id_above_vocabulary)
    with caplog.at_level(logging.ERROR):
        assert jf.run_finetune(data.finetune_argv(tmp_path / "out", "--prompt_type", "lora")) == 2
    message = caplog.records[-1].getMessage()
    assert "before training any fold" in message and "fold 1" in message and "fold 0:" not in message
    assert f"{data.fold_file(1, 'test')}: holds negative token id -1" in message
    assert f"{data.fold_file(1, 'val')}: 1 cells have no gene token" in message
    assert f"{data.fold_file(1, 'train')}: holds token id 10000" in message
    run = jf.run_dir(tmp_path / "out", "lora", data)
    assert not (run / "0").exists() and not (run / ".resume").exists(), "fold 0 never started"
    last = _last_record((run / "run.log").read_text())
    assert "run stopped:" in last and "negative token id -1" in last


def test_empty_split_saved_with_zero_shards(job_data, tmp_path, caplog):
    data = jf.copy_job_data(job_data, tmp_path)
    path = jf.rewrite_split(data, 1, "val", lambda columns: {name: [] for name in columns})
    with caplog.at_level(logging.ERROR):
        assert jf.run_finetune(data.finetune_argv(tmp_path / "out", "--prompt_type", "lora")) == 2
    message = caplog.records[-1].getMessage()
    assert f"{path}: the dataset holds no cells" in message and "fold 1" in message


def test_text_file_named_h5ad(tmp_path, caplog):
    from geneformer_peft.cli import main

    fake = tmp_path / "cells.h5ad"
    fake.write_text("cell,gene\nA,1\n")
    with caplog.at_level(logging.ERROR):
        status = main(["tokenize", "--input", str(fake), "--output", str(tmp_path / "x.dataset"),
                       "--build_vocab", str(tmp_path / "vocab")])
    assert status == 2
    assert f"{fake}: not an HDF5 file" in _errors(caplog)


def test_labels_absent_from_train_cell_ids_and_umask(job_data, tmp_path, caplog):
    """Warned up front, listed per fold in summary.json; predictions.csv carries the dataset's
    cell_id; outputs follow the user's umask."""
    import datasets
    import pandas as pd

    data = jf.copy_job_data(job_data, tmp_path)

    def unseen_label_and_ids(columns):
        columns["cell_type"][0] = "Unseen cell"
        columns["cell_id"] = [f"AAAC-{i}" for i in range(len(columns["cell_type"]))]

    jf.rewrite_split(data, 1, "test", unseen_label_and_ids)
    previous = os.umask(0o002)
    try:
        with caplog.at_level(logging.WARNING):
            assert jf.run_finetune(data.finetune_argv(tmp_path / "out", "--prompt_type", "lora", "--folds", "1",
                                                      "--epoch", "1")) == 0
    finally:
        os.umask(previous)
    warning = next(r.getMessage() for r in caplog.records if "absent from train" in r.getMessage())
    assert "fold 1: test has ['Unseen cell']" in warning
    run = jf.run_dir(tmp_path / "out", "lora", data)
    assert jf.read_json(run / "summary.json")["labels_absent_from_train"] == {"1": {"test": ["Unseen cell"]}}
    frame = pd.read_csv(run / "1" / "predictions.csv")
    test = datasets.load_from_disk(str(data.fold_file(1, "test")))
    assert list(frame.columns[:2]) == ["index", "cell_id"] and frame["cell_id"].tolist() == test["cell_id"]
    assert (run / "1").stat().st_mode & 0o777 == 0o775
    for name in ("peft_model.safetensors", "metrics.json", "predictions.csv", "provenance.json"):
        assert (run / "1" / name).stat().st_mode & 0o777 == 0o664, name


def test_ctrl_c_is_one_line_exit_130_and_keeps_finished_folds(job_data, tmp_path):
    argv = job_data.finetune_argv(tmp_path, "--prompt_type", "lora", "--epoch", "40", "--early_stopping_patience", "0")
    run = jf.run_dir(tmp_path, "lora", job_data)
    checkpoint = run / ".resume" / "1" / "epoch_checkpoint.pt"
    # SIG_DFL in the child: a test run started in the background by a shell without job control
    # inherits SIGINT ignored, and Python keeps an ignored SIGINT ignored
    proc = subprocess.Popen([sys.executable, str(jf.SCRIPT), *argv], env=jf._subprocess_env(), cwd=jf.ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        deadline = time.monotonic() + 500
        while not checkpoint.is_file() and proc.poll() is None:
            assert time.monotonic() < deadline, "fold 1 never wrote a checkpoint"
            time.sleep(0.2)
        assert proc.poll() is None, "the run ended before it could be interrupted"
        done = {p.name: p.stat().st_mtime_ns for p in (run / "0").iterdir()}
        proc.send_signal(signal.SIGINT)
        _, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130
    assert "Traceback" not in stderr
    last = stderr.strip().splitlines()[-1]
    assert "interrupted during fold 1 epoch " in last and "rerun the same command to resume" in last
    assert {p.name: p.stat().st_mtime_ns for p in (run / "0").iterdir()} == done
    assert (run / "0" / "fold_done.json").is_file() and checkpoint.is_file()
    record = _last_record((run / "run.log").read_text())
    assert "run stopped: interrupted during fold 1 epoch" in record
    assert not (run / ".lock").exists(), "the lock is released on Ctrl-C"
    shutil.rmtree(run)
