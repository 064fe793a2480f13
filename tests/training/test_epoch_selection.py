"""The epoch a fold keeps: by validation macro-F1 (the job's default, ties to the lower loss)
or by validation loss (``--select_epoch_by loss``, ties to the higher macro-F1); early stopping
watches the same score; a resumed fold refuses a checkpoint selected the other way."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from geneformer_peft.data.cells import EncodedCells
from geneformer_peft.training.arguments import TrainingArguments
from geneformer_peft.training.trainer import BestModel, FoldTrainer
from transformerslocal import BertConfig, BertForSequenceClassification, mark_trainable

TINY = dict(vocab_size=60, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37,
            max_position_embeddings=64, num_labels=3, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)


def cells(n: int, seed: int, name: str) -> EncodedCells:
    rng = np.random.default_rng(seed)
    lengths = rng.integers(5, 30, size=n)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    labels = rng.integers(0, 3, size=n)
    flat = rng.integers(2, TINY["vocab_size"], size=offsets[-1]).astype(np.int32)
    marked = rng.random(n) < 0.5
    for i, label in enumerate(labels):  # half the cells carry their class's marker token first:
        if marked[i]:  # learnable, but the rest is memorised, so the validation loss rises again
            flat[offsets[i]] = 2 + label
    return EncodedCells(flat, offsets, labels=labels, name=name)


def trainer(by: str, epochs: int = 6, patience: int = 0, checkpoint_dir=None) -> FoldTrainer:
    torch.manual_seed(0)
    model = BertForSequenceClassification(BertConfig(**TINY))
    mark_trainable(model)
    args = TrainingArguments(epochs=epochs, batch_size=8, lr=2e-2, progress=False, select_epoch_by=by,
                             early_stopping_patience=patience)
    return FoldTrainer(model, cells(48, 1, "train"), cells(12, 2, "val"), args, class_weights=None,
                       device=torch.device("cpu"), checkpoint_dir=checkpoint_dir)


def kept_epoch(history: list[dict], by: str) -> int:
    """The epoch the rule picks, computed directly from the recorded scores."""
    if by == "loss":
        key = lambda h: (h["val_loss"], -h["val_macro_f1"], h["epoch"])  # noqa: E731
    else:
        key = lambda h: (-h["val_macro_f1"], h["val_loss"], h["epoch"])  # noqa: E731
    return min(history, key=key)["epoch"]


def test_the_kept_epoch_is_the_best_by_the_chosen_score():
    kept = {}
    for by in ("macro_f1", "loss"):
        fit = trainer(by, epochs=8).fit()
        assert len(fit.history) == 8
        assert fit.best_epoch == kept_epoch(fit.history, by)
        assert fit.best_val_macro_f1 == fit.history[fit.best_epoch - 1]["val_macro_f1"]
        kept[by] = fit.best_epoch
    assert kept["macro_f1"] != kept["loss"]  # this task's loss rises while macro-F1 still climbs


def test_the_two_rules_differ_where_loss_and_macro_f1_disagree():
    best_f1, best_loss = BestModel(by="macro_f1"), BestModel(by="loss")
    model = torch.nn.Linear(2, 2)
    # (macro-F1, loss) per epoch: a lucky macro-F1 at epoch 2, the lowest loss at epoch 4
    for epoch, (f1, loss) in enumerate([(0.5, 0.9), (0.93, 0.37), (0.9, 0.3), (0.92, 0.24)], start=1):
        best_f1.update(model, epoch, f1, loss)
        best_loss.update(model, epoch, f1, loss)
    assert (best_f1.epoch, best_f1.stale) == (2, 2)
    assert (best_loss.epoch, best_loss.stale) == (4, 0)
    tie = BestModel(by="loss")
    tie.update(model, 1, 0.5, 0.3)
    assert tie.update(model, 2, 0.6, 0.3) and tie.epoch == 2  # same loss, higher macro-F1


def test_early_stopping_watches_the_chosen_score():
    """Patience 1 on the loss: every epoch but the last lowered the validation loss, and the run
    stopped at the first that did not (or ran out of epochs)."""
    fit = trainer("loss", epochs=12, patience=1).fit()
    losses = [h["val_loss"] for h in fit.history]
    assert all(b < a for a, b in zip(losses[:-2], losses[1:-1]))
    if fit.stopped_early:
        assert losses[-1] >= min(losses[:-1])
    else:
        assert len(losses) == 12
    assert fit.best_epoch == kept_epoch(fit.history, "loss")


def test_resume_refuses_a_checkpoint_selected_the_other_way(tmp_path):
    first = trainer("macro_f1", epochs=3, checkpoint_dir=tmp_path)
    first.model.train()
    first._train_epoch(1)
    first._save_checkpoint(1, {"best": BestModel(by="macro_f1").to_dict(), "history": [], "train_seconds": 0.0,
                               "train_cells": 0, "stopped_early": False})
    with pytest.raises(ValueError, match="select_epoch_by='macro_f1'.*'loss'"):
        trainer("loss", epochs=3, checkpoint_dir=tmp_path).fit()


def test_select_epoch_by_is_checked():
    with pytest.raises(ValueError, match="select_epoch_by='f1'.*one of \\['macro_f1', 'loss'\\]"):
        TrainingArguments(select_epoch_by="f1")
