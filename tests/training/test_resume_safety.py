"""The resume checkpoint is read with ``torch.load(weights_only=True)``: a planted pickle runs
nothing, and a truncated, foreign or old-format checkpoint is discarded with one warning (the
fold starts again from epoch 1) instead of stopping every rerun and ``--overwrite``."""
from __future__ import annotations

import logging
import random

import numpy as np
import pytest
import torch

import job_factories as jf
from geneformer_peft.data.cells import EncodedCells
from geneformer_peft.training import trainer as trainer_module
from geneformer_peft.training.arguments import TrainingArguments
from geneformer_peft.training.trainer import CHECKPOINT_NAME, BestModel, FoldTrainer
from transformerslocal import BertConfig, BertForSequenceClassification, mark_trainable

TINY = dict(vocab_size=40, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37,
            max_position_embeddings=32, num_labels=3)


def cells(n: int, seed: int, name: str) -> EncodedCells:
    rng = np.random.default_rng(seed)
    lengths = rng.integers(5, 20, size=n)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    flat = rng.integers(2, TINY["vocab_size"], size=offsets[-1]).astype(np.int32)
    return EncodedCells(flat, offsets, labels=rng.integers(0, 3, size=n), name=name)


def make_trainer(checkpoint_dir, epochs: int = 2, **config) -> FoldTrainer:
    torch.manual_seed(0)
    model = BertForSequenceClassification(BertConfig(**{**TINY, **config}))
    mark_trainable(model)
    args = TrainingArguments(epochs=epochs, batch_size=8, lr=1e-2, progress=False)
    return FoldTrainer(model, cells(24, 1, "train"), cells(8, 2, "val"), args, class_weights=None,
                       device=torch.device("cpu"), checkpoint_dir=checkpoint_dir, desc="fold 7")


def checkpoint_after_one_epoch(directory) -> FoldTrainer:
    """A trainer that ran epoch 1 and saved its checkpoint in ``directory``."""
    first = make_trainer(directory)
    first.model.train()
    first._train_epoch(1)
    first._save_checkpoint(1, {"best": BestModel().to_dict(), "history": [{"epoch": 1}], "train_seconds": 1.0,
                               "train_cells": 24, "stopped_early": False})
    return first


def fresh_history(tmp_path) -> list[float]:
    fit = make_trainer(tmp_path / "fresh").fit()
    return [h["val_loss"] for h in fit.history]


def discard_warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records
            if r.levelno == logging.WARNING and "resume checkpoint" in r.getMessage()]


# ----------------------------------------------------------------------------- the saved form


def test_checkpoint_reads_with_weights_only_and_restores_every_generator(tmp_path):
    checkpoint_after_one_epoch(tmp_path)
    payload = torch.load(tmp_path / CHECKPOINT_NAME, map_location="cpu", weights_only=True)
    assert set(payload["rng"]) >= {"torch", "numpy", "python"}

    # the draws after saving are the draws after resuming (Python's generator was not saved before)
    expected = (torch.rand(3), np.random.rand(3), [random.random() for _ in range(3)])
    torch.manual_seed(123), np.random.seed(123), random.seed(123)
    resumed = make_trainer(tmp_path)
    assert resumed._load_checkpoint()["epoch"] == 1
    torch.testing.assert_close(torch.rand(3), expected[0])
    np.testing.assert_array_equal(np.random.rand(3), expected[1])
    assert [random.random() for _ in range(3)] == expected[2]


# ----------------------------------------------------------------------------- a planted pickle


class Planted:
    """Unpickling this calls ``exec`` on code that creates ``marker``."""

    def __init__(self, marker) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return exec, (f"open({self.marker!r}, 'w').close()",)


def test_a_planted_checkpoint_runs_nothing_and_the_fold_starts_afresh(tmp_path, caplog):
    # the old loader (weights_only=False) runs the file's code
    old_marker = tmp_path / "ran_with_old_loader"
    torch.save({"epoch": Planted(old_marker)}, tmp_path / "old.pt")
    torch.load(tmp_path / "old.pt", map_location="cpu", weights_only=False)
    assert old_marker.exists()

    marker = tmp_path / "ran"
    resume_dir = tmp_path / "resume"
    resume_dir.mkdir()
    checkpoint = resume_dir / CHECKPOINT_NAME
    torch.save({"epoch": Planted(marker), "model": {}}, checkpoint)
    with caplog.at_level(logging.WARNING):
        fit = make_trainer(resume_dir).fit()
    assert not marker.exists()
    (message,) = discard_warnings(caplog)
    assert str(checkpoint) in message and "exec" in message and "epoch 1" in message
    assert [h["epoch"] for h in fit.history] == [1, 2]
    assert [h["val_loss"] for h in fit.history] == fresh_history(tmp_path)


# ----------------------------------------------------------------------------- unusable checkpoints


def _truncated(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _empty(path):
    path.write_bytes(b"")


def _foreign(path):  # a weight file of some other model under the checkpoint's name
    torch.save({"classifier.weight": torch.zeros(2, 2)}, path)


def _old_format(path):  # written before this version: numpy's generator state as an ndarray
    payload = torch.load(path, map_location="cpu", weights_only=True)
    payload["rng"] = {"torch": torch.get_rng_state(), "numpy": np.random.get_state()}
    torch.save(payload, path)


def _other_model(path):  # the same names, other sizes (hidden 48)
    other = make_trainer(path.parent / "other", hidden_size=48)
    other._save_checkpoint(1, {"best": BestModel().to_dict(), "history": [], "train_seconds": 0.0,
                               "train_cells": 0, "stopped_early": False})
    (path.parent / "other" / CHECKPOINT_NAME).replace(path)


@pytest.mark.parametrize("spoil, reason", [
    (_truncated, "zip archive"), (_empty, "EOFError"), (_foreign, "not a resume checkpoint"),
    (_old_format, "numpy"), (_other_model, "is (40, 48); this model's is (40, 32)"),
])
def test_an_unusable_checkpoint_is_discarded_with_one_warning(tmp_path, caplog, spoil, reason):
    resume_dir = tmp_path / "resume"
    checkpoint_after_one_epoch(resume_dir)
    checkpoint = resume_dir / CHECKPOINT_NAME
    spoil(checkpoint)
    with caplog.at_level(logging.WARNING):
        fit = make_trainer(resume_dir).fit()
    (message,) = discard_warnings(caplog)
    assert str(checkpoint) in message and reason in message, message
    assert [h["val_loss"] for h in fit.history] == fresh_history(tmp_path)


def test_a_checkpoint_that_fails_half_way_leaves_nothing_loaded(tmp_path, caplog):
    """The weights fit but the optimiser state does not: the weights loaded first are rolled back."""
    resume_dir = tmp_path / "resume"
    checkpoint_after_one_epoch(resume_dir)
    checkpoint = resume_dir / CHECKPOINT_NAME
    payload = torch.load(checkpoint, map_location="cpu", weights_only=True)
    payload["optimizer"]["param_groups"] = payload["optimizer"]["param_groups"][:1]
    torch.save(payload, checkpoint)
    with caplog.at_level(logging.WARNING):
        fit = make_trainer(resume_dir).fit()
    (message,) = discard_warnings(caplog)
    assert "does not fit this run" in message and "ValueError" in message
    assert [h["val_loss"] for h in fit.history] == fresh_history(tmp_path)


# ----------------------------------------------------------------------------- through the job


class Interrupted(Exception):
    """Stands for a killed process (raised right after an epoch checkpoint was written)."""


@pytest.fixture(scope="module")
def reference_fold0(job_data, tmp_path_factory):
    output = tmp_path_factory.mktemp("reference")
    assert jf.run_finetune(job_data.finetune_argv(output, "--prompt_type", "lora", "--folds", "0")) == 0
    return jf.result_metrics(jf.read_json(jf.run_dir(output, "lora", job_data) / "0" / "metrics.json"))


@pytest.mark.parametrize("rerun_flags", [[], ["--overwrite"]], ids=["rerun", "overwrite"])
def test_a_truncated_checkpoint_never_blocks_a_rerun(job_data, tmp_path, monkeypatch, caplog, reference_fold0,
                                                      rerun_flags):
    argv = job_data.finetune_argv(tmp_path, "--prompt_type", "lora", "--folds", "0")
    original = trainer_module.FoldTrainer._save_checkpoint

    def save_then_die(self, epoch, state):
        original(self, epoch, state)
        raise Interrupted("killed after epoch 1")

    monkeypatch.setattr(trainer_module.FoldTrainer, "_save_checkpoint", save_then_die)
    with pytest.raises(Interrupted):
        jf.run_finetune(argv)
    monkeypatch.undo()
    run = jf.run_dir(tmp_path, "lora", job_data)
    checkpoint = run / ".resume" / "0" / CHECKPOINT_NAME
    _truncated(checkpoint)

    caplog.clear()
    with caplog.at_level(logging.INFO):
        assert jf.run_finetune([*argv, *rerun_flags]) == 0
    (message,) = discard_warnings(caplog)
    assert str(checkpoint) in message and "not a readable torch file" in message
    assert "fold 0 epoch 1:" in caplog.text and "resuming after" not in caplog.text
    assert jf.result_metrics(jf.read_json(run / "0" / "metrics.json")) == reference_fold0
    assert not checkpoint.exists()
