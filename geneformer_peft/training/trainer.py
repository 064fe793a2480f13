"""Fine-tuning loop of one fold: AdamW, warmup schedule, class-weighted cross-entropy,
early stopping on validation macro-F1, best model restored, resumable per epoch."""
from __future__ import annotations

import logging
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from geneformer_peft.data.cells import EncodedCells, collate_cells
from geneformer_peft.training import distributed
from geneformer_peft.models.device import autocast
from geneformer_peft.evaluation.inference import predict_logits
from geneformer_peft.evaluation.metrics import macro_f1
from geneformer_peft.data.samplers import BalancedLengthGroupedSampler, LengthGroupedSampler
from geneformer_peft.training.arguments import TrainingArguments

logger = logging.getLogger(__name__)

CHECKPOINT_NAME = "epoch_checkpoint.pt"


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite."""


@dataclass
class FitResult:
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
    import random

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def make_sampler(cells: EncodedCells, args: TrainingArguments, *, num_replicas: int = 1, rank: int = 0):
    if args.sampler == "balanced":
        return BalancedLengthGroupedSampler(cells.lengths, cells.labels, args.batch_size, seed=args.seed,
                                            num_replicas=num_replicas, rank=rank)
    if args.sampler == "length":
        return LengthGroupedSampler(cells.lengths, args.batch_size, seed=args.seed,
                                    num_replicas=num_replicas, rank=rank)
    return _RandomSampler(len(cells), args.seed, num_replicas, rank)


class _RandomSampler(torch.utils.data.Sampler):
    """Plain shuffling (no length grouping), reproducible per seed and epoch."""

    def __init__(self, n: int, seed: int, num_replicas: int = 1, rank: int = 0) -> None:
        self.n, self.seed, self.num_replicas, self.rank, self.epoch = n, seed, num_replicas, rank, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        order = np.random.default_rng([self.seed, self.epoch]).permutation(self.n)
        per_rank = -(-self.n // self.num_replicas)
        order = np.resize(order, per_rank * self.num_replicas)
        return iter(order[self.rank::self.num_replicas].tolist())

    def __len__(self) -> int:
        return -(-self.n // self.num_replicas)


def make_optimizer(model, *, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    """AdamW over the trainable parameters; no weight decay on biases and LayerNorms."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        (no_decay if param.ndim < 2 or "LayerNorm" in name else decay).append(param)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr)


def make_scheduler(optimizer, total_steps: int, *, warmup_steps: int = 0, warmup_ratio: float = 0.0,
                   schedule: str = "linear"):
    """Linear warmup (``warmup_steps``, else ``warmup_ratio`` of all steps), then linear decay
    to zero, cosine decay, or a constant rate."""
    warmup = warmup_steps or int(math.ceil(warmup_ratio * total_steps))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        if schedule == "constant":
            return 1.0
        progress = (step - warmup) / max(1, total_steps - warmup)
        if schedule == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
        return max(0.0, 1.0 - progress)

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


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
    epoch with the best validation macro-F1.

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
    """

    def __init__(self, model, train: EncodedCells, val: EncodedCells, args: TrainingArguments, *,
                 class_weights: torch.Tensor | None, device: torch.device, checkpoint_dir: Path | None = None,
                 encoder_cache=None, sampler=None, desc: str = "fold") -> None:
        self.model, self.train_cells, self.val_cells, self.args = model, train, val, args
        self.device = device
        self.class_weights = class_weights.to(device) if class_weights is not None else None
        self.checkpoint_dir = Path(checkpoint_dir) if checkpoint_dir else None
        self.encoder_cache = encoder_cache
        self.sampler = sampler if sampler is not None else make_sampler(
            train, args, num_replicas=distributed.world_size(), rank=distributed.rank())
        self.runner = model
        if distributed.is_distributed():
            from torch.nn.parallel import DistributedDataParallel

            ids = [device.index] if device.type == "cuda" else None
            self.runner = DistributedDataParallel(model, device_ids=ids)
        self.desc = desc
        self.loader = DataLoader(train, batch_size=args.batch_size, sampler=self.sampler,
                                 collate_fn=self._collate, num_workers=args.num_workers)
        self.optimizer = make_optimizer(model, lr=args.lr, weight_decay=args.weight_decay)
        self.total_steps = args.epochs * len(self.loader)
        self.scheduler = make_scheduler(self.optimizer, self.total_steps, warmup_steps=args.warmup_steps,
                                        warmup_ratio=args.warmup_ratio, schedule=args.lr_schedule)
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
        args, model = self.args, self.model
        result = FitResult()
        best_state, best_score, best_loss, stale = None, -1.0, float("inf"), 0
        start_epoch = 1
        resumed = self._load_checkpoint()
        if resumed is not None:
            start_epoch = resumed["epoch"] + 1
            best_state, best_score = resumed["best_state"], resumed["best_score"]
            best_loss, stale = resumed["best_loss"], resumed["stale"]
            result.history = resumed["history"]
            result.best_epoch = resumed["best_epoch"]
            result.train_seconds, result.train_cells = resumed["train_seconds"], resumed["train_cells"]
            result.epochs_run = resumed["epoch"]
            result.stopped_early = resumed.get("stopped_early", False)
        trainable = [p for p in model.parameters() if p.requires_grad]
        for epoch in range(start_epoch, args.epochs + 1):
            if result.stopped_early:
                break
            model.train()
            if self.encoder_cache is not None:
                self.encoder_cache.prepare(model)
            self.sampler.set_epoch(epoch)
            t0, seen, loss_sum, steps = time.perf_counter(), 0, 0.0, 0
            bar = tqdm(self.loader, desc=f"{self.desc} epoch {epoch}/{args.epochs}", disable=None if args.progress else True,
                       leave=False)
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
            epoch_seconds = time.perf_counter() - t0
            result.train_seconds += epoch_seconds
            result.train_cells += seen
            val_loss, val_f1, _ = self.evaluate(self.val_cells)
            record = {"epoch": epoch, "train_loss": loss_sum / max(steps, 1), "val_loss": val_loss,
                      "val_macro_f1": val_f1, "epoch_seconds": epoch_seconds,
                      "train_cells_per_second": seen / max(epoch_seconds, 1e-9),
                      "lr": self.scheduler.get_last_lr()[0]}
            result.history.append(record)
            result.epochs_run = epoch
            logger.info("%s epoch %d: train loss %.4f, val loss %.4f, val macro-F1 %.4f, %.1f cells/s",
                        self.desc, epoch, record["train_loss"], val_loss, val_f1, record["train_cells_per_second"])
            # Best on validation macro-F1; ties go to the lower validation loss.
            if val_f1 > best_score or (val_f1 == best_score and val_loss < best_loss):
                best_state, best_score, best_loss, stale = _trainable_state(model), val_f1, val_loss, 0
                result.best_epoch = epoch
            else:
                stale += 1
                if args.early_stopping_patience and stale >= args.early_stopping_patience:
                    result.stopped_early = True
                    logger.info("%s: early stop after epoch %d (no better val macro-F1 for %d epochs)",
                                self.desc, epoch, stale)
            self._save_checkpoint(epoch, {
                "best_state": best_state, "best_score": best_score, "best_loss": best_loss, "stale": stale,
                "history": result.history, "best_epoch": result.best_epoch, "train_seconds": result.train_seconds,
                "train_cells": result.train_cells, "stopped_early": result.stopped_early})
        if best_state is not None:
            model.load_state_dict(best_state, strict=False)
        result.best_val_macro_f1 = best_score
        model.eval()
        return result
