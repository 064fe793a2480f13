"""Fine-tuning loop of one fold: AdamW, warmup schedule, class-weighted cross-entropy,
early stopping on validation macro-F1 (or loss), best model restored, resumable per epoch."""
from __future__ import annotations

import logging
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from geneformer_peft.data.cells import EncodedCells, collate_cells
from geneformer_peft.data.samplers import (
    BalancedLengthGroupedSampler,
    LengthGroupedSampler,
    ShuffledSampler,
)
from geneformer_peft.errors import TrainingDiverged
from geneformer_peft.evaluation.inference import predict_logits
from geneformer_peft.evaluation.metrics import macro_f1
from geneformer_peft.models.device import autocast
from geneformer_peft.training import distributed
from geneformer_peft.training.arguments import TrainingArguments
from geneformer_peft.training.schedules import make_optimizer, make_scheduler

logger = logging.getLogger(__name__)

__all__ = ["BestModel", "FitResult", "FoldTrainer", "make_sampler", "set_seed"]

CHECKPOINT_NAME = "epoch_checkpoint.pt"


@dataclass
class BestModel:
    """The best epoch so far: its trainable weights and scores, and the early-stopping count.

    ``by="macro_f1"``: the highest validation macro-F1, a tie going to the lower validation
    loss; ``by="loss"``: the lowest validation loss, a tie going to the higher macro-F1. On a
    small validation split macro-F1 moves in steps of a few cells and a lucky epoch wins; the
    cross-entropy counts every cell's probability and varies smoothly.
    """

    state: dict | None = None
    score: float = -1.0
    loss: float = float("inf")
    epoch: int = 0
    stale: int = 0
    by: str = "macro_f1"

    def update(self, model: torch.nn.Module, epoch: int, val_f1: float, val_loss: float) -> bool:
        """Keep ``model``'s trainable weights if this epoch is better; return whether it was."""
        if self.by == "loss":
            better = val_loss < self.loss or (val_loss == self.loss and val_f1 > self.score)
        else:
            better = val_f1 > self.score or (val_f1 == self.score and val_loss < self.loss)
        if better:
            self.state, self.score, self.loss, self.epoch, self.stale = (
                _trainable_state(model), val_f1, val_loss, epoch, 0)
            return True
        self.stale += 1
        return False

    def restore(self, model: torch.nn.Module) -> None:
        """Load the kept weights back into ``model`` (nothing when no epoch ran)."""
        if self.state is not None:
            model.load_state_dict(self.state, strict=False)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_checkpoint(cls, payload: dict) -> BestModel:
        """From a resume checkpoint; also reads the flat keys of checkpoints written before
        the best model was one object."""
        if "best" in payload:
            return cls(**payload["best"])
        return cls(state=payload["best_state"], score=payload["best_score"], loss=payload["best_loss"],
                   epoch=payload["best_epoch"], stale=payload["stale"])


@dataclass
class FitResult:
    """What :meth:`FoldTrainer.fit` did: per-epoch history, best epoch, timing."""

    history: list = field(default_factory=list)
    best_epoch: int = 0
    best_val_macro_f1: float = float("nan")
    epochs_run: int = 0
    stopped_early: bool = False
    train_seconds: float = 0.0
    train_cells: int = 0

    @property
    def cells_per_second(self) -> float:
        return self.train_cells / self.train_seconds if self.train_seconds > 0 else float("nan")


def set_seed(seed: int) -> None:
    """Seed Python's, NumPy's and torch's global generators."""
    import random

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def make_sampler(cells: EncodedCells, args: TrainingArguments, *, num_replicas: int = 1,
                 rank: int = 0) -> torch.utils.data.Sampler:
    """The training sampler named by ``args.sampler``, sharded for ``rank`` of ``num_replicas``."""
    if args.sampler == "balanced":
        return BalancedLengthGroupedSampler(cells.lengths, cells.labels, args.batch_size, seed=args.seed,
                                            num_replicas=num_replicas, rank=rank)
    if args.sampler == "length":
        return LengthGroupedSampler(cells.lengths, args.batch_size, seed=args.seed,
                                    num_replicas=num_replicas, rank=rank)
    return ShuffledSampler(len(cells), seed=args.seed, num_replicas=num_replicas, rank=rank)


def _trainable_state(model) -> dict:
    return {n: p.detach().clone().cpu() for n, p in model.named_parameters() if p.requires_grad}


def _rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class FoldTrainer:
    """Train ``model`` (its ``requires_grad`` flags already set) on ``train`` and select the
    epoch with the best validation macro-F1 (or loss, ``args.select_epoch_by``).

    Parameters
    ----------
    model
        A ``BertForSequenceClassification``.
    train, val
        Encoded splits with labels.
    args
        Training settings.
    class_weights
        Per-class loss weights (``None``: unweighted).
    device
        Where to train.
    checkpoint_dir
        Where the per-epoch checkpoint for resuming goes; ``None`` disables it.
    encoder_cache
        A :class:`~geneformer_peft.training.frozen_cache.FrozenPrefixCache` or ``None``.
    epoch_callback
        Called as ``epoch_callback(epoch, record)`` after each epoch (``record``: that epoch's
        history entry); an exception it raises (e.g. a hyperparameter search pruning the
        trial) ends :meth:`fit` and propagates.
    """

    def __init__(self, model, train: EncodedCells, val: EncodedCells, args: TrainingArguments, *,
                 class_weights: torch.Tensor | None, device: torch.device, checkpoint_dir: Path | None = None,
                 encoder_cache=None, desc: str = "fold", epoch_callback=None) -> None:
        self.model, self.train_cells, self.val_cells, self.args = model, train, val, args
        self.device = device
        self.class_weights = class_weights.to(device) if class_weights is not None else None
        self.checkpoint_dir = Path(checkpoint_dir) if checkpoint_dir else None
        self.encoder_cache = encoder_cache
        self.epoch_callback = epoch_callback
        self.sampler = make_sampler(train, args, num_replicas=distributed.world_size(), rank=distributed.rank())
        self.runner = model
        if distributed.is_distributed():
            from torch.nn.parallel import DistributedDataParallel

            ids = [device.index] if device.type == "cuda" else None
            self.runner = DistributedDataParallel(model, device_ids=ids)
        self.desc = desc
        self.epoch = 0
        self.loader = DataLoader(train, batch_size=args.batch_size, sampler=self.sampler,
                                 collate_fn=self._collate, num_workers=args.num_workers)
        self.optimizer = make_optimizer(model, lr=args.lr, weight_decay=args.weight_decay,
                                        layer_decay=args.layer_decay)
        self.total_steps = args.epochs * len(self.loader)
        self.scheduler = make_scheduler(self.optimizer, self.total_steps, warmup_steps=args.warmup_steps,
                                        warmup_ratio=args.warmup_ratio, schedule=args.lr_schedule,
                                        lr_end=args.lr_end)
        self.scaler = torch.amp.GradScaler("cuda") if args.precision == "fp16" else None

    def _collate(self, items):
        return collate_cells(items, pad_to_multiple_of=self.args.pad_to_multiple_of)

    # ------------------------------------------------------------------ pieces
    def loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits.float(), labels, weight=self.class_weights)

    def forward_logits(self, batch) -> torch.Tensor:
        if self.encoder_cache is not None:
            return self.encoder_cache.forward(self.model, batch, self.device, runner=self.runner)
        return self.runner(batch["input_ids"].to(self.device, non_blocking=True),
                          batch["attention_mask"].to(self.device, non_blocking=True)).logits

    def evaluate(self, cells: EncodedCells, desc: str = "validate") -> tuple[float, float, np.ndarray]:
        """(loss, macro-F1, logits) on ``cells``."""
        logits = predict_logits(self.model, cells, batch_size=self.args.eval_batch_size or self.args.batch_size,
                                device=self.device, precision=self.args.precision, desc=desc,
                                progress=self.args.progress, encoder_cache=self.encoder_cache)
        labels = torch.from_numpy(cells.labels)
        weight = self.class_weights.cpu() if self.class_weights is not None else None
        loss = F.cross_entropy(torch.from_numpy(logits), labels, weight=weight).item()
        f1 = macro_f1(cells.labels, logits.argmax(axis=1), num_classes=logits.shape[1])
        return loss, f1, logits

    # ------------------------------------------------------------------ resume
    def _checkpoint_path(self) -> Path | None:
        return self.checkpoint_dir / CHECKPOINT_NAME if self.checkpoint_dir else None

    def _save_checkpoint(self, epoch: int, state: dict) -> None:
        path = self._checkpoint_path()
        if path is None or not distributed.is_main_process():
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        payload = {"epoch": epoch, "model": _trainable_state(self.model), "optimizer": self.optimizer.state_dict(),
                   "scheduler": self.scheduler.state_dict(), "rng": _rng_state(), **state}
        if self.scaler is not None:
            payload["scaler"] = self.scaler.state_dict()
        tmp = path.with_suffix(".tmp")
        torch.save(payload, tmp)
        os.replace(tmp, path)

    def _load_checkpoint(self) -> dict | None:
        path = self._checkpoint_path()
        if path is None or not path.is_file():
            return None
        payload = torch.load(path, map_location="cpu", weights_only=False)
        self.model.load_state_dict(payload["model"], strict=False)
        self.optimizer.load_state_dict(payload["optimizer"])
        self.scheduler.load_state_dict(payload["scheduler"])
        if self.scaler is not None and "scaler" in payload:
            self.scaler.load_state_dict(payload["scaler"])
        _set_rng_state(payload["rng"])
        logger.info("%s: resuming after epoch %d from %s", self.desc, payload["epoch"], path)
        return payload

    # ------------------------------------------------------------------ loop
    def fit(self) -> FitResult:
        """Train for ``args.epochs`` (or until early stopping), resuming from the epoch
        checkpoint when there is one; the best epoch's weights are restored at the end."""
        result, best = FitResult(), BestModel(by=self.args.select_epoch_by)
        start_epoch = 1
        resumed = self._load_checkpoint()
        if resumed is not None:
            start_epoch = resumed["epoch"] + 1
            best = BestModel.from_checkpoint(resumed)
            if best.by != self.args.select_epoch_by:
                raise ValueError(f"{self.desc}: the epoch checkpoint was written with select_epoch_by="
                                 f"{best.by!r}, this run asks for {self.args.select_epoch_by!r}; rerun with "
                                 f"--select_epoch_by {best.by} or --overwrite")
            result.history = resumed["history"]
            result.train_seconds, result.train_cells = resumed["train_seconds"], resumed["train_cells"]
            result.epochs_run = resumed["epoch"]
            result.stopped_early = resumed.get("stopped_early", False)
        self.epoch = start_epoch  # the epoch in progress (named when a run is interrupted)
        for epoch in range(start_epoch, self.args.epochs + 1):
            if result.stopped_early:
                break
            self.epoch = epoch
            train_loss, seen, epoch_seconds = self._train_epoch(epoch)
            result.train_seconds += epoch_seconds
            result.train_cells += seen
            val_loss, val_f1, _ = self.evaluate(self.val_cells)
            record = {"epoch": epoch, "train_loss": train_loss, "val_loss": val_loss, "val_macro_f1": val_f1,
                      "epoch_seconds": epoch_seconds, "train_cells_per_second": seen / max(epoch_seconds, 1e-9),
                      "lr": self.scheduler.get_last_lr()[0]}
            result.history.append(record)
            result.epochs_run = epoch
            logger.info("%s epoch %d: train loss %.4f, val loss %.4f, val macro-F1 %.4f, %.1f cells/s",
                        self.desc, epoch, train_loss, val_loss, val_f1, record["train_cells_per_second"])
            if not best.update(self.model, epoch, val_f1, val_loss):
                patience = self.args.early_stopping_patience
                if patience and best.stale >= patience:
                    result.stopped_early = True
                    logger.info("%s: early stop after epoch %d (no better val %s for %d epochs)",
                                self.desc, epoch, best.by.replace("_", "-"), best.stale)
            self._save_checkpoint(epoch, {
                "best": best.to_dict(), "history": result.history, "train_seconds": result.train_seconds,
                "train_cells": result.train_cells, "stopped_early": result.stopped_early})
            if self.epoch_callback is not None:
                self.epoch_callback(epoch, record)
        best.restore(self.model)
        result.best_epoch, result.best_val_macro_f1 = best.epoch, best.score
        self.model.eval()
        return result

    def _train_epoch(self, epoch: int) -> tuple[float, int, float]:
        """One pass over the training sampler: (mean train loss, cells seen by all ranks, seconds)."""
        args, model = self.args, self.model
        model.train()
        if self.encoder_cache is not None:
            self.encoder_cache.prepare(model)
        self.sampler.set_epoch(epoch)
        trainable = [p for p in model.parameters() if p.requires_grad]
        t0, seen, loss_sum, steps = time.perf_counter(), 0, 0.0, 0
        bar = tqdm(self.loader, desc=f"{self.desc} epoch {epoch}/{args.epochs}",
                   disable=None if args.progress else True, leave=False)
        for step, batch in enumerate(bar, start=1):
            labels = batch["labels"].to(self.device)
            with autocast(self.device, args.precision):
                logits = self.forward_logits(batch)
            loss = self.loss(logits, labels)
            if not torch.isfinite(loss):
                raise TrainingDiverged(
                    f"{self.desc}: loss is {loss.item()} at epoch {epoch}, step {step} "
                    f"(lr {self.scheduler.get_last_lr()[0]:.3g}); lower --lr or use --precision fp32")
            self.optimizer.zero_grad(set_to_none=True)
            if self.scaler is not None:
                self.scaler.scale(loss).backward()
                self.scaler.unscale_(self.optimizer)
            else:
                loss.backward()
            if args.max_grad_norm:
                torch.nn.utils.clip_grad_norm_(trainable, args.max_grad_norm)
            if self.scaler is not None:
                self.scaler.step(self.optimizer)
                self.scaler.update()
            else:
                self.optimizer.step()
            self.scheduler.step()
            seen += len(labels) * distributed.world_size()  # every rank trains an equal shard
            loss_sum += loss.item()
            steps += 1
            elapsed = time.perf_counter() - t0
            bar.set_postfix(loss=f"{loss_sum / steps:.4f}", cells_s=f"{seen / max(elapsed, 1e-9):.0f}")
        return loss_sum / max(steps, 1), seen, time.perf_counter() - t0
