"""Multi-task cell classification: one shared encoder (any family, any PEFT method), one
classification head per task, the loss a weighted sum of the tasks' cross-entropies.

The heads are the family's own classifier head with one block of output rows per task: the
classifier's ``num_labels`` is the sum of the tasks' class counts, and task ``t`` reads the
logits ``[start_t, stop_t)``. Each block is an independent linear map of the shared pooled
vector (one ``Linear`` per task, stored as one matrix), so saving, loading, PEFT weights,
prediction and the frozen-layer cache of a single-task classifier work unchanged. The fold's
``config.json`` records the tasks and their label lists under ``tasks`` (``[{"name": column,
"labels": [...]}, ...]``), so a fold model is read back without its data.

A cell whose label for a task is missing (``None``, NaN or an empty string) counts for the
other tasks only: its label id there is :data:`MISSING` and it is masked out of that task's
loss, metrics and baseline. A cell without any label is refused before training.

Loss: ``sum_t w_t * CE_t`` with fixed weights (``--task_weights 1,0.5``; default 1 each), or
learned uncertainty weighting (``--task_weights uncertainty``, Kendall, Gal & Cipolla 2018):
``sum_t exp(-s_t) * CE_t + s_t / 2`` with a learned log-variance ``s_t`` per task. Epoch
selection and early stopping read the mean over tasks of the validation macro-F1 (or of the
validation cross-entropies with ``--select_epoch_by loss``). See ``docs/multitask.md``.
"""
from __future__ import annotations

import logging
import math
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from geneformer_peft.errors import DataError
from geneformer_peft.evaluation.tasks import (  # noqa: F401 (re-exported: the job's names)
    MISSING,
    Task,
    TaskSet,
    class_probabilities,
    combine_task_metrics,
    is_missing,
    task_predictions_frame,
)

logger = logging.getLogger(__name__)

__all__ = ["MISSING", "UNCERTAINTY", "MultiTaskLoss", "Task", "TaskSet", "combine_task_metrics", "is_missing",
           "is_multitask", "parse_task_weights", "task_class_weights", "task_columns", "task_file",
           "task_predictions_frame", "write_task_predictions"]

#: ``--task_weights`` value that learns the weights (uncertainty weighting)
UNCERTAINTY = "uncertainty"


def task_columns(label_column: str | Sequence[str]) -> list[str]:
    """The label columns of ``--label_column``: ``"cell_type"``, ``"cell_type,state"`` or a list.

    Raises
    ------
    DataError
        For an empty name or a column named twice.
    """
    parts = label_column.split(",") if isinstance(label_column, str) else list(label_column)
    columns = [str(p).strip() for p in parts]
    if not columns or any(not c for c in columns):
        raise DataError(f"--label_column {label_column!r}: expected one column name, or several separated by commas "
                        "(e.g. cell_type,disease), none empty")
    twice = sorted({c for c in columns if columns.count(c) > 1})
    if twice:
        raise DataError(f"--label_column {label_column!r} names {twice} more than once; expected each task once")
    return columns


def is_multitask(label_column: str | Sequence[str]) -> bool:
    """Whether ``label_column`` names two or more tasks."""
    return len(task_columns(label_column)) > 1


def parse_task_weights(value: str | Sequence[float] | None, n_tasks: int) -> list[float] | str | None:
    """``--task_weights``: ``None`` (1 each), ``"uncertainty"``, or one number >= 0 per task
    (``"1,0.5"`` or a list), not all 0.

    Raises
    ------
    DataError
        Naming the value and what was expected.
    """
    if value is None:
        return None
    if isinstance(value, str) and value.strip() == UNCERTAINTY:
        return UNCERTAINTY
    try:
        weights = [float(v) for v in (value.split(",") if isinstance(value, str) else value)]
    except (TypeError, ValueError):
        weights = []
    if (len(weights) != n_tasks or not all(math.isfinite(w) and w >= 0 for w in weights)
            or not any(w > 0 for w in weights)):
        raise DataError(f"--task_weights {value!r}: expected {UNCERTAINTY!r} or {n_tasks} numbers >= 0 separated by "
                        f"commas, one per task of --label_column, not all 0 (e.g. {','.join(['1'] * n_tasks)})")
    return weights


class MultiTaskLoss(nn.Module):
    """The training loss of a multi-task classifier.

    Parameters
    ----------
    tasks
        The tasks (their blocks of logits).
    weights
        One fixed weight per task, ``None`` (1 each), or ``"uncertainty"`` (learned
        log-variances ``s_t``, initialised at 0: ``sum_t exp(-s_t) * CE_t + s_t / 2``).
    class_weights
        Per task the cross-entropy class weights, or ``None`` (unweighted).
    """

    def __init__(self, tasks: TaskSet, *, weights: Sequence[float] | str | None = None,
                 class_weights: Sequence[torch.Tensor | None] | None = None) -> None:
        super().__init__()
        self.tasks = tasks
        self.uncertainty = weights == UNCERTAINTY
        fixed = [1.0] * len(tasks) if weights is None or self.uncertainty else [float(w) for w in weights]
        if len(fixed) != len(tasks):
            raise ValueError(f"{len(fixed)} task weights for {len(tasks)} tasks")
        self.fixed_weights = fixed
        self.log_vars = nn.Parameter(torch.zeros(len(tasks))) if self.uncertainty else None
        class_weights = list(class_weights) if class_weights is not None else [None] * len(tasks)
        for k, weight in enumerate(class_weights):
            self.register_buffer(f"class_weight_{k}", weight, persistent=False)

    def class_weight(self, k: int) -> torch.Tensor | None:
        return getattr(self, f"class_weight_{k}")

    def task_weights(self) -> list[float]:
        """The current weight of each task's cross-entropy (``exp(-s_t)`` when learned)."""
        if self.log_vars is None:
            return list(self.fixed_weights)
        return [float(w) for w in torch.exp(-self.log_vars.detach()).cpu()]

    def forward(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """The weighted loss of a batch: ``logits`` (B, num_labels), ``labels`` (B, n_tasks) with
        :data:`MISSING` for a missing label; a task without a labelled cell in the batch adds nothing."""
        logits = logits.float()
        total = None
        for k, task in enumerate(self.tasks):
            target = labels[:, k]
            if not bool((target != MISSING).any()):
                continue
            loss = F.cross_entropy(logits[:, task.start:task.stop], target, weight=self.class_weight(k),
                                   ignore_index=MISSING)
            if self.log_vars is not None:
                loss = torch.exp(-self.log_vars[k]) * loss + 0.5 * self.log_vars[k]
            elif self.fixed_weights[k] != 1.0:
                loss = self.fixed_weights[k] * loss
            total = loss if total is None else total + loss
        if total is None:  # cannot happen with the up-front check (every cell has a label)
            raise DataError("a training batch holds no label of any task")
        return total

    def evaluate(self, logits: np.ndarray, labels: np.ndarray) -> tuple[float, float, dict[str, dict[str, float]]]:
        """Validation ``(loss, score, per task {"loss", "macro_f1"})``: each task's
        class-weighted cross-entropy and macro-F1 over the cells with its label; ``loss`` and
        ``score`` are their means over the tasks (tasks without a validation label left out)."""
        from geneformer_peft.evaluation.metrics import macro_f1

        per_task: dict[str, dict[str, float]] = {}
        for k, task in enumerate(self.tasks):
            known = labels[:, k] != MISSING
            if not known.any():
                continue
            block = logits[:, task.start:task.stop]
            target = labels[:, k]
            if not known.all():
                block, target = block[known], target[known]
            weight = self.class_weight(k)
            loss = F.cross_entropy(torch.from_numpy(np.ascontiguousarray(block)), torch.from_numpy(target),
                                   weight=weight.cpu() if weight is not None else None).item()
            f1 = macro_f1(target, block.argmax(axis=1), num_classes=task.num_labels)
            per_task[task.name] = {"loss": loss, "macro_f1": f1}
        if not per_task:
            return float("nan"), float("nan"), per_task
        loss = float(np.mean([v["loss"] for v in per_task.values()]))
        score = float(np.mean([v["macro_f1"] for v in per_task.values()]))
        return loss, score, per_task


def task_class_weights(tasks: TaskSet, train_labels: np.ndarray, class_weighting: str) -> list[torch.Tensor | None]:
    """Per task the reference class weights ``(1 - n_c/N)^2`` over the training cells with that
    task's label (``class_weighting="reference"``), else ``None`` each."""
    from geneformer_peft.data.samplers import class_weights

    if class_weighting != "reference":
        return [None] * len(tasks)
    out = []
    for k, task in enumerate(tasks):
        known = train_labels[:, k][train_labels[:, k] != MISSING]
        if known.size == 0:
            raise DataError(f"task {task.name!r}: no training cell has a label; expected labels in train for every "
                            "task of --label_column")
        out.append(class_weights(known, task.num_labels, id2label=dict(enumerate(task.labels))))
    return out


def task_file(stem: str, task: str, suffix: str) -> str:
    """The file name of a per-task output: ``<stem>_<task><suffix>`` (characters other than
    letters, digits, ``.``, ``-`` and ``_`` of the task name as ``_``)."""
    safe = "".join(c if c.isalnum() or c in "._-" else "_" for c in task)
    return f"{stem}_{safe}{suffix}"


def write_task_predictions(folder, tasks: TaskSet, test, logits: np.ndarray, metrics: dict, history: list) -> None:
    """A multi-task fold's ``predictions.csv`` (:func:`task_predictions_frame`) and
    ``predictions.pickle`` (``tasks``, ``labels`` (n_cells, n_tasks) with :data:`MISSING`,
    ``predictions`` (n_cells, n_tasks), ``logits``, ``probabilities`` per task, ``metrics``, ``history``)."""
    import io
    from pathlib import Path

    from geneformer_peft.evaluation.outputs import write_pickle, write_text

    folder = Path(folder)
    frame = task_predictions_frame(tasks, logits, cell_index=test.index, true_ids=test.labels, cell_ids=test.cell_ids)
    buffer = io.StringIO()
    frame.to_csv(buffer, index=False)
    write_text(folder / "predictions.csv", buffer.getvalue())
    predictions = tasks.predictions(logits)
    write_pickle(folder / "predictions.pickle", {
        "tasks": tasks.config_value(), "labels": test.labels,
        "predictions": np.stack([preds for _, preds in predictions], axis=1), "logits": logits,
        "probabilities": {task.name: probs for task, (probs, _) in zip(tasks, predictions)},
        "metrics": metrics, "history": history})
