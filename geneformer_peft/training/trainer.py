"""Fine-tuning loop of one fold: AdamW, warmup schedule, class-weighted cross-entropy,
early stopping on validation macro-F1 (or loss), best model restored, resumable per epoch."""
from __future__ import annotations

import copy
import logging
import random
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from geneformer_peft.data.cells import EncodedCells, collate_cells, model_inputs
from geneformer_peft.data.samplers import (
    BalancedLengthGroupedSampler,
    LengthGroupedSampler,
    ShuffledSampler,
)
from geneformer_peft.errors import TrainingDiverged
from geneformer_peft.evaluation.inference import predict_logits
from geneformer_peft.evaluation.metrics import macro_f1
from geneformer_peft.files import write_torch
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
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def make_sampler(cells: EncodedCells, args: TrainingArguments, *, num_replicas: int = 1,
                 rank: int = 0) -> torch.utils.data.Sampler:
    """The training sampler named by ``args.sampler``, sharded for ``rank`` of ``num_replicas``."""
    if args.sampler == "balanced":
        labels = cells.labels if cells.labels.ndim == 1 else cells.labels[:, 0]  # multi-task: the first task's
        return BalancedLengthGroupedSampler(cells.lengths, labels, args.batch_size, seed=args.seed,
                                            num_replicas=num_replicas, rank=rank)
    if args.sampler == "length":
        return LengthGroupedSampler(cells.lengths, args.batch_size, seed=args.seed,
                                    num_replicas=num_replicas, rank=rank)
    return ShuffledSampler(len(cells), seed=args.seed, num_replicas=num_replicas, rank=rank)


def _trainable_state(model) -> dict:
    return {n: p.detach().clone().cpu() for n, p in model.named_parameters() if p.requires_grad}


def _rng_state() -> dict:
    """Every generator's state as tensors, strings and numbers, which ``torch.load(weights_only=True)`` reads."""
    name, key, pos, has_gauss, cached_gaussian = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    state = {"torch": torch.get_rng_state(),
             "numpy": {"bit_generator": str(name), "key": torch.from_numpy(key.astype(np.int64)), "pos": int(pos),
                       "has_gauss": int(has_gauss), "cached_gaussian": float(cached_gaussian)},
             "python": {"version": int(version), "internal": [int(x) for x in internal], "gauss_next": gauss_next}}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    numpy_state = state["numpy"]
    np.random.set_state((numpy_state["bit_generator"], numpy_state["key"].numpy().astype(np.uint32),
                         numpy_state["pos"], numpy_state["has_gauss"], numpy_state["cached_gaussian"]))
    python_state = state["python"]
    random.setstate((python_state["version"], tuple(python_state["internal"]), python_state["gauss_next"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


#: the entries of a resume checkpoint, and the type of each
_CHECKPOINT_FIELDS = {"epoch": int, "model": dict, "optimizer": dict, "scheduler": dict, "rng": dict, "best": dict,
                      "history": list, "train_seconds": (int, float), "train_cells": int}
_BEST_FIELDS = {"score": (int, float), "loss": (int, float), "epoch": int, "stale": int, "by": str}


def _checkpoint_problem(payload, trainable: dict[str, torch.Tensor]) -> str | None:
    """Why ``payload`` is not a resume checkpoint of a model with these ``trainable`` weights (``None``: it is)."""
    if not isinstance(payload, dict):
        return f"it holds a {type(payload).__name__}, not a resume checkpoint"
    for key, kind in _CHECKPOINT_FIELDS.items():
        if key not in payload:
            return f"it has no {key!r} entry (not a resume checkpoint of this version)"
        if not isinstance(payload[key], kind) or isinstance(payload[key], bool):
            return f"its {key!r} entry is a {type(payload[key]).__name__}"
    if payload["epoch"] < 1:
        return f"its epoch is {payload['epoch']}"
    if not all(k in payload["rng"] for k in ("torch", "numpy", "python")):
        return "its random generator states are incomplete (a checkpoint of an older version)"
    weights = payload["model"]
    missing, unexpected = sorted(set(trainable) - set(weights)), sorted(set(weights) - set(trainable))
    if missing or unexpected:
        return (f"its weights are not this model's trainable weights ({len(missing)} missing, e.g. {missing[:2]}; "
                f"{len(unexpected)} unexpected, e.g. {unexpected[:2]})")
    best = payload["best"]
    unknown = set(best) - {f.name for f in fields(BestModel)}
    if unknown:
        return f"its best-epoch record has unknown entries {sorted(unknown)}"
    for key, kind in _BEST_FIELDS.items():
        if key in best and (not isinstance(best[key], kind) or isinstance(best[key], bool)):
            return f"its best-epoch {key} is a {type(best[key]).__name__}"
    best_state = best.get("state")
    if best_state is not None and not isinstance(best_state, dict):
        return f"its best-epoch weights are a {type(best_state).__name__}"
    for name, value in [*weights.items(), *(best_state or {}).items()]:
        if name not in trainable:
            return f"its best-epoch weight {name} is not one of this model's trainable weights"
        if not isinstance(value, torch.Tensor) or value.shape != trainable[name].shape:
            shape = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
            return f"its weight {name} is {shape}; this model's is {tuple(trainable[name].shape)}"
    if not all(isinstance(record, dict) for record in payload["history"]):
        return "its history is not a list of per-epoch records"
    return None


def _load_failure(error: Exception) -> str:
    """torch.load's error in one line (its messages run to paragraphs of advice that does not apply here)."""
    text = str(error)
    marker = "WeightsUnpickler error:"
    if marker in text:  # the file names a global (code) or an opcode that weights_only refuses
        text = text[text.index(marker) + len(marker):].strip()
        text = text.split(". Please use")[0]
    text = text.strip().split("\n")[0].split(". ")[0].rstrip(".")
    return f"not a readable torch file: {type(error).__name__}" + (f": {text}" if text else " (it ends early)")


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
    objective
        A multi-task classifier's :class:`~geneformer_peft.training.multitask.MultiTaskLoss`
        (``train``/``val`` labels then (n_cells, n_tasks)); ``class_weights`` is unused and
        validation scores are the means over tasks. ``None``: single-task cross-entropy.
    epoch_callback
        Called as ``epoch_callback(epoch, record)`` after each epoch (``record``: that epoch's
        history entry); an exception it raises (e.g. a hyperparameter search pruning the
        trial) ends :meth:`fit` and propagates.
    """

    def __init__(self, model, train: EncodedCells, val: EncodedCells, args: TrainingArguments, *,
                 class_weights: torch.Tensor | None, device: torch.device, checkpoint_dir: Path | None = None,
                 encoder_cache=None, desc: str = "fold", epoch_callback=None, objective=None) -> None:
        self.model, self.train_cells, self.val_cells, self.args = model, train, val, args
        self.device = device
        self.class_weights = class_weights.to(device) if class_weights is not None else None
        self.checkpoint_dir = Path(checkpoint_dir) if checkpoint_dir else None
        self.encoder_cache = encoder_cache
        self.epoch_callback = epoch_callback
        self.objective = objective.to(device) if objective is not None else None
        self.task_scores: dict[str, dict[str, float]] = {}  # multi-task: the last evaluation's per-task scores
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
        objective_params = [p for p in self.objective.parameters() if p.requires_grad] if objective else []
        if objective_params:  # learned task weights: no decay (before the scheduler, which sets every group's rate)
            self.optimizer.add_param_group({"params": objective_params, "weight_decay": 0.0, "lr": args.lr,
                                            "name": "task_weighting"})
        self.total_steps = args.epochs * len(self.loader)
        self.scheduler = make_scheduler(self.optimizer, self.total_steps, warmup_steps=args.warmup_steps,
                                        warmup_ratio=args.warmup_ratio, schedule=args.lr_schedule,
                                        lr_end=args.lr_end)
        self.scaler = torch.amp.GradScaler("cuda") if args.precision == "fp16" else None

    def _collate(self, items):
        return collate_cells(items, pad_to_multiple_of=self.args.pad_to_multiple_of)

    # ------------------------------------------------------------------ pieces
    def loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        if self.objective is not None:
            return self.objective(logits, labels)
        return F.cross_entropy(logits.float(), labels, weight=self.class_weights)

    def forward_logits(self, batch) -> torch.Tensor:
        if self.encoder_cache is not None:
            return self.encoder_cache.forward(self.model, batch, self.device, runner=self.runner)
        return self.runner(*model_inputs(batch, self.device)).logits

    def evaluate(self, cells: EncodedCells, desc: str = "validate") -> tuple[float, float, np.ndarray]:
        """(loss, macro-F1, logits) on ``cells``."""
        logits = predict_logits(self.model, cells, batch_size=self.args.eval_batch_size or self.args.batch_size,
                                device=self.device, precision=self.args.precision, desc=desc,
                                progress=self.args.progress, encoder_cache=self.encoder_cache)
        if self.objective is not None:
            loss, f1, self.task_scores = self.objective.evaluate(logits, cells.labels)
            return loss, f1, logits
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
        if self.objective is not None:
            payload["objective"] = self.objective.state_dict()
        write_torch(path, payload)  # atomic, unique temp name; a full disk is an OSError naming the file

    def _load_checkpoint(self) -> dict | None:
        """The epoch checkpoint, its states loaded into the model, optimiser, scheduler and
        generators; ``None`` when there is none or it is unusable.

        It is read with ``torch.load(weights_only=True)``, so a file that names any code (a
        planted pickle) runs nothing. A truncated, foreign or older-format file is discarded
        with a warning (the fold starts from epoch 1 and the next epoch's checkpoint replaces
        it): a checkpoint only saves time, so it never stops a run.
        """
        path = self._checkpoint_path()
        if path is None or not path.is_file():
            return None
        try:
            payload = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as error:  # torch raises RuntimeError, UnpicklingError, EOFError ... for a bad file
            return self._discard_checkpoint(path, _load_failure(error))
        trainable = {n: p for n, p in self.model.named_parameters() if p.requires_grad}
        problem = _checkpoint_problem(payload, trainable)
        if problem is not None:
            return self._discard_checkpoint(path, problem)
        before = self._resumable_state()
        try:
            self._restore(payload)
        except (RuntimeError, ValueError, KeyError, TypeError, IndexError, AttributeError) as error:
            self._restore(before)  # a half-loaded state would train neither the old run nor a fresh one
            return self._discard_checkpoint(path, f"it does not fit this run ({type(error).__name__}: "
                                                  f"{str(error).splitlines()[0] if str(error) else ''})")
        logger.info("%s: resuming after epoch %d from %s", self.desc, payload["epoch"], path)
        return payload

    def _resumable_state(self) -> dict:
        state = {"model": _trainable_state(self.model), "optimizer": copy.deepcopy(self.optimizer.state_dict()),
                 "scheduler": copy.deepcopy(self.scheduler.state_dict()), "rng": _rng_state()}
        if self.scaler is not None:
            state["scaler"] = copy.deepcopy(self.scaler.state_dict())
        if self.objective is not None:
            state["objective"] = copy.deepcopy(self.objective.state_dict())
        return state

    def _restore(self, state: dict) -> None:
        self.model.load_state_dict(state["model"], strict=False)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if self.scaler is not None and "scaler" in state:
            self.scaler.load_state_dict(state["scaler"])
        if self.objective is not None and "objective" in state:
            self.objective.load_state_dict(state["objective"])
        _set_rng_state(state["rng"])

    def _discard_checkpoint(self, path: Path, reason: str) -> None:
        logger.warning("%s: the resume checkpoint %s cannot be used (%s); it is ignored and the fold starts again "
                       "from epoch 1", self.desc, path, reason)
        return None

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
            if self.objective is not None:  # multi-task: the scores above are means over tasks
                for name, scores in self.task_scores.items():
                    record[f"val_loss.{name}"], record[f"val_macro_f1.{name}"] = scores["loss"], scores["macro_f1"]
                for name, weight in zip(self.objective.tasks.names, self.objective.task_weights()):
                    record[f"task_weight.{name}"] = weight
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
