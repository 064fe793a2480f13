"""The tasks of a multi-task classifier (``config.json`` ``tasks``): their label lists and
blocks of logits, label ids with :data:`MISSING` for a missing label, per-task predictions,
probabilities and metrics. Used by training (``training/multitask.py``), prediction, embedding
and perturbation alike. See ``docs/multitask.md``."""
from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from geneformer_peft.errors import DataError

logger = logging.getLogger(__name__)

__all__ = ["MISSING", "TASK_SCALARS", "Task", "TaskSet", "class_probabilities", "combine_task_metrics", "is_missing",
           "task_predictions_frame"]

#: label id of a cell whose label for a task is missing
MISSING = -1
#: the scalar metrics averaged over tasks and repeated per task as ``<task>.<metric>`` in metrics.json
TASK_SCALARS = ("accuracy", "balanced_accuracy", "macro_precision", "macro_recall", "macro_f1", "micro_precision",
                "micro_recall", "micro_f1", "weighted_f1", "mean_confidence")


def is_missing(value: Any) -> bool:
    """Whether a label value is missing: ``None``, a NaN or an empty string."""
    if value is None:
        return True
    if isinstance(value, float) and math.isnan(value):
        return True
    return isinstance(value, str) and not value.strip()


@dataclass(frozen=True)
class Task:
    """One task: its label column, its label names (id order) and its block of logits."""

    name: str
    labels: tuple[str, ...]
    start: int

    @property
    def stop(self) -> int:
        return self.start + len(self.labels)

    @property
    def num_labels(self) -> int:
        return len(self.labels)


class TaskSet:
    """The tasks of a multi-task classifier, in ``--label_column`` order."""

    def __init__(self, tasks: Sequence[tuple[str, Sequence[str]]]) -> None:
        self.tasks: list[Task] = []
        start = 0
        for name, labels in tasks:
            self.tasks.append(Task(str(name), tuple(str(label) for label in labels), start))
            start += len(labels)

    def __len__(self) -> int:
        return len(self.tasks)

    def __iter__(self):
        return iter(self.tasks)

    @property
    def names(self) -> list[str]:
        return [t.name for t in self.tasks]

    @property
    def num_labels(self) -> int:
        return sum(t.num_labels for t in self.tasks)

    # ------------------------------------------------------------------ config
    @property
    def label2id(self) -> dict[str, int]:
        """The classifier's labels: ``"<task>:<label>"`` for every task's labels, block after block."""
        return {f"{t.name}:{label}": t.start + i for t in self.tasks for i, label in enumerate(t.labels)}

    def config_value(self) -> list[dict[str, Any]]:
        """What ``config.json`` records under ``tasks``."""
        return [{"name": t.name, "labels": list(t.labels)} for t in self.tasks]

    @classmethod
    def from_config(cls, config) -> TaskSet | None:
        """The tasks a fold's config records, ``None`` for a single-task classifier.

        Raises
        ------
        DataError
            When the recorded tasks do not add up to the classifier's ``num_labels``.
        """
        recorded = getattr(config, "tasks", None)
        if not recorded:
            return None
        try:
            tasks = cls([(entry["name"], entry["labels"]) for entry in recorded])
        except (TypeError, KeyError) as error:
            raise DataError(f"config key 'tasks' is {recorded!r}; expected a list of {{'name': column, 'labels': "
                            f"[...]}} (written by the multi-task fine-tuning job)") from error
        if tasks.num_labels != config.num_labels:
            raise DataError(f"config key 'tasks' lists {tasks.num_labels} labels over {tasks.names}, but the "
                            f"classifier has num_labels {config.num_labels}; expected a config.json written by "
                            "the multi-task fine-tuning job")
        return tasks

    # ------------------------------------------------------------------ data
    @classmethod
    def from_datasets(cls, splits: Mapping[str, Any], columns: Sequence[str]) -> TaskSet:
        """Each task's label names over the splits together, in sorted order (as
        :func:`~geneformer_peft.data.folds.label_mapping`), missing values left out.

        Raises
        ------
        DataError
            A column missing from a split, or a task without any label.
        """
        tasks = []
        for column in columns:
            found: set = set()
            for split, dataset in splits.items():
                if column not in dataset.column_names:
                    raise DataError(f"{split} dataset: label column {column!r} does not exist; expected one of "
                                    f"{dataset.column_names} (set --label_column)")
                found |= {v for v in dataset.unique(column) if not is_missing(v)}
            if not found:
                raise DataError(f"label column {column!r} holds no label in any split; expected labels for every task")
            tasks.append((column, [str(v) for v in sorted(found)]))
        return cls(tasks)

    def encode(self, dataset, *, name: str = "cells", for_prediction: bool = False) -> np.ndarray:
        """(n_cells, n_tasks) int64 label ids of ``dataset``, :data:`MISSING` where a task's label is missing.

        ``for_prediction``: cells to predict, which need no label: a task whose column the dataset
        lacks is all :data:`MISSING` and unlabelled cells are kept.

        Raises
        ------
        DataError
            For a label outside the task's label set, or (training) cells without any label.
        """
        out = np.full((len(dataset), len(self.tasks)), MISSING, dtype=np.int64)
        for k, task in enumerate(self.tasks):
            if for_prediction and task.name not in dataset.column_names:
                continue
            index = {label: i for i, label in enumerate(task.labels)}
            values = dataset[task.name]
            unknown = sorted({str(v) for v in values if not is_missing(v) and str(v) not in index})
            if unknown:
                raise DataError(f"{name}: labels {unknown} of column {task.name!r} are not in the model's label set "
                                f"{list(task.labels)}")
            out[:, k] = [MISSING if is_missing(v) else index[str(v)] for v in values]
        unlabelled = np.flatnonzero((out == MISSING).all(axis=1))
        if len(unlabelled) and not for_prediction:
            raise DataError(f"{name}: {len(unlabelled)} cells have no label in any of the columns {self.names} "
                            f"(e.g. rows {unlabelled[:5].tolist()}); expected at least one label per cell "
                            "(a cell missing one task's label counts for the other tasks)")
        return out

    def block(self, logits, task: Task):
        """Task ``task``'s logits (the columns of its head)."""
        return logits[:, task.start:task.stop]

    # ------------------------------------------------------------------ evaluation
    def predictions(self, logits: np.ndarray) -> list[tuple[np.ndarray, np.ndarray]]:
        """Per task ``(probabilities, predicted ids)`` (softmax over the task's own block)."""
        from geneformer_peft.evaluation.inference import softmax

        out = []
        for task in self.tasks:
            probs = softmax(self.block(logits, task))
            out.append((probs, probs.argmax(axis=1)))
        return out

    def metrics(self, labels: np.ndarray, logits: np.ndarray) -> dict[str, Any]:
        """Test metrics: per task :func:`classification_metrics` over the cells with that task's
        label (under ``tasks``, and its scalars flat as ``<task>.<metric>``), and the mean over
        tasks of each scalar at the top level (what epoch selection and the summary headline read)."""
        from geneformer_peft.evaluation.metrics import classification_metrics

        per_task: dict[str, Any] = {}
        for k, (task, (probs, preds)) in enumerate(zip(self.tasks, self.predictions(logits))):
            known = labels[:, k] != MISSING
            if not known.any():
                logger.warning("task %r: no cell has a label; its metrics are left out", task.name)
                continue
            entry = classification_metrics(labels[known, k], preds[known], label_names=task.labels,
                                           probabilities=probs[known])
            entry["n_missing"] = int((~known).sum())
            per_task[task.name] = entry
        return combine_task_metrics(per_task, n_cells=len(labels))


def combine_task_metrics(per_task: Mapping[str, Mapping[str, Any]], *, n_cells: int) -> dict[str, Any]:
    """One metrics record of a multi-task model (or baseline) from each task's: the mean over
    tasks of each scalar of :data:`TASK_SCALARS` at the top level, each task's scalars flat as
    ``<task>.<metric>``, and each task's whole record under ``tasks``."""
    out: dict[str, Any] = {}
    for metric in TASK_SCALARS:
        values = [m[metric] for m in per_task.values() if metric in m]
        if values:
            out[metric] = float(np.mean(values))
    out["n_cells"] = int(n_cells)
    for name, entry in per_task.items():
        for metric in (*TASK_SCALARS, "n_cells", "n_missing"):
            if metric in entry:
                out[f"{name}.{metric}"] = entry[metric]
    out["tasks"] = {name: dict(entry) for name, entry in per_task.items()}
    return out


def task_predictions_frame(tasks: TaskSet, logits: np.ndarray, *, cell_index: Sequence[Any],
                           true_ids: np.ndarray | None = None, cell_ids: Sequence[Any] | None = None,
                           truth_tasks: set[str] | None = None):
    """One row per cell: ``index``, ``cell_id`` (with ``cell_ids``), then per task the pair
    ``<task>_true`` (empty where the label is missing; only with ``true_ids``, and only for the
    tasks in ``truth_tasks`` when given) and ``<task>_pred``, then ``<task>_confidence`` and
    ``<task>_prob_<label>`` for each of its labels."""
    import pandas as pd

    columns: dict[str, Any] = {"index": list(cell_index)}
    if cell_ids is not None:
        columns["cell_id"] = list(cell_ids)
    predictions = tasks.predictions(logits)
    for k, (task, (_, preds)) in enumerate(zip(tasks, predictions)):
        names = np.asarray(task.labels, dtype=object)
        if true_ids is not None and (truth_tasks is None or task.name in truth_tasks):
            truth = true_ids[:, k]
            columns[f"{task.name}_true"] = np.where(truth == MISSING, "", names[np.maximum(truth, 0)])
        columns[f"{task.name}_pred"] = names[preds]
    for task, (probs, _) in zip(tasks, predictions):
        columns[f"{task.name}_confidence"] = probs.max(axis=1) if len(probs) else np.zeros(0)
        for i, label in enumerate(task.labels):
            column = f"{task.name}_prob_{label}"
            if column in columns:
                raise ValueError(f"task {task.name!r} label {label!r} gives a duplicate column {column!r}")
            columns[column] = probs[:, i]
    return pd.DataFrame(columns)


def class_probabilities(logits: torch.Tensor, config) -> torch.Tensor:
    """A classifier's class probabilities: the softmax over all classes, or for a multi-task
    classifier (``config.tasks``) over each task's own block of classes."""
    tasks = TaskSet.from_config(config)
    logits = logits.float()
    if tasks is None:
        return logits.softmax(dim=-1)
    return torch.cat([logits[..., t.start:t.stop].softmax(dim=-1) for t in tasks], dim=-1)
