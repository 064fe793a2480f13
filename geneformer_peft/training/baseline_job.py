"""The linear baseline inside the cross-validation job (``--baselines logreg``).

Per fold, after the model is tested: a logistic regression on the same train/val/test
cells (:mod:`geneformer_peft.evaluation.baseline`), written into the fold folder as
``baseline_metrics.json``, ``baseline_predictions.csv`` and ``baseline_per_class_f1.png``
before ``fold_done.json``. The run summary gains the baseline's summary and the paired
comparison (:mod:`geneformer_peft.evaluation.comparison`). Only rank 0 fits the baseline
under torchrun. ``--baselines none`` writes none of it. See ``docs/baseline.md``.
"""
from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from geneformer_peft.data.cells import EncodedCells
from geneformer_peft.data.vocab import load_token_dictionary
from geneformer_peft.evaluation.baseline import (
    BASELINE_FEATURES,
    BASELINE_METHODS,
    BaselineResult,
    fold_baseline,
    special_token_ids,
)
from geneformer_peft.evaluation.comparison import (
    BASELINE_NAME,
    format_comparison_table,
    method_display_name,
    paired_comparison,
)
from geneformer_peft.evaluation.comparison_plots import plot_per_class_f1
from geneformer_peft.evaluation.outputs import (
    summarize_folds,
    write_json,
    write_predictions_csv,
)
from geneformer_peft.training import distributed

logger = logging.getLogger(__name__)

__all__ = [
    "BASELINE_FIGURE_FILE",
    "BASELINE_METRICS_FILE",
    "BASELINE_PREDICTIONS_FILE",
    "add_baseline_summary",
    "add_task_summaries",
    "compute_multitask_baseline",
    "write_multitask_baseline",
    "check_baseline_data",
    "check_baseline_options",
    "compute_fold_baseline",
    "read_fold_baseline",
    "write_fold_baseline",
]

BASELINE_METRICS_FILE = "baseline_metrics.json"
BASELINE_PREDICTIONS_FILE = "baseline_predictions.csv"
BASELINE_FIGURE_FILE = "baseline_per_class_f1.png"


def check_baseline_options(baselines: str, features: str) -> None:
    """Raise ValueError for an unknown ``--baselines`` or ``--baseline_features`` value."""
    if baselines not in BASELINE_METHODS:
        raise ValueError(f"--baselines {baselines!r}: expected one of {list(BASELINE_METHODS)}")
    if features not in BASELINE_FEATURES:
        raise ValueError(f"--baseline_features {features!r}: expected one of {list(BASELINE_FEATURES)}")


def check_baseline_data(opts, folds: Sequence[int]) -> None:
    """Before any training: the options are known, and with ``--baseline_features expression``
    every split of the selected folds carries the raw-expression columns.

    Raises
    ------
    ValueError
        For an unknown option value.
    DataError
        Naming the split file and the missing columns.
    """
    baselines = getattr(opts, "baselines", "logreg")
    features = getattr(opts, "baseline_features", "tokens")
    check_baseline_options(baselines, features)
    if baselines == "none" or features != "expression":
        return
    from geneformer_peft.data.folds import load_fold
    from geneformer_peft.errors import DataError
    from geneformer_peft.evaluation.baseline import EXPRESSION_IDS, EXPRESSION_VALUES

    for fold in folds:
        for split, ds in zip(("train", "val", "test"), load_fold(opts.data_path, opts.dataset_name, fold)):
            missing = [c for c in (EXPRESSION_IDS, EXPRESSION_VALUES) if c not in ds.column_names]
            if missing:
                raise DataError(f"fold {fold} {split} of dataset {opts.dataset_name!r} under {opts.data_path}: "
                                f"--baseline_features expression needs the columns {missing}, found "
                                f"{ds.column_names} (see docs/baseline.md); or pass --baseline_features tokens")


def compute_fold_baseline(opts, fold: int, cells: Mapping[str, EncodedCells], datasets: Mapping[str, Any],
                          config, class_weight, train_seconds: float | None = None) -> BaselineResult | None:
    """Fit and test the fold's baseline (rank 0 only); None with ``--baselines none``.

    Parameters
    ----------
    opts : RunOptions
        ``baselines``, ``baseline_features``, the vocabulary and the seed come from here.
    fold : int
        The fold number (the seed is ``seed + fold``, as the model's).
    cells, datasets : mapping
        ``train``/``val``/``test`` splits as the model saw them, and their datasets.
    config : BertConfig
        The fold's model config (``vocab_size``, ``id2label``).
    class_weight : torch.Tensor or None
        The model's cross-entropy class weights.
    train_seconds : float, optional
        The model's training time, to report the baseline's share of it.

    Returns
    -------
    BaselineResult or None
    """
    baselines = getattr(opts, "baselines", "logreg")
    features = getattr(opts, "baseline_features", "tokens")
    check_baseline_options(baselines, features)
    if baselines == "none" or not distributed.is_main_process():
        return None
    names = [config.id2label[i] for i in range(config.num_labels)]
    return _fit_baseline(opts, fold, cells, datasets, config, names, class_weight, train_seconds)


def _fit_baseline(opts, fold: int, cells: Mapping[str, EncodedCells], datasets: Mapping[str, Any], config,
                  names: Sequence[str], class_weight, train_seconds: float | None, task: str | None = None
                  ) -> BaselineResult:
    from geneformer_peft.training.cross_validation import vocabulary_source

    features = getattr(opts, "baseline_features", "tokens")
    vocabulary = vocabulary_source(opts)
    specials = special_token_ids(load_token_dictionary(vocabulary) if vocabulary is not None else None)
    weights = None if class_weight is None else np.asarray(class_weight.detach().cpu().numpy(), dtype=np.float64)
    from geneformer_peft.models.families import family_of_config

    # a fixed-length family (scBERT) reads binned expression, one token per panel gene; CellFM gene ids with values
    family = family_of_config(config)
    encoding = "binned" if family.fixed_length else "values" if family.values_column is not None else "rank"
    result = fold_baseline(cells, label_names=names, features=features, encoding=encoding,
                           n_features=getattr(config, "vocab_size", None),
                           special_ids=specials, datasets=datasets, class_weight=weights,
                           seed=opts.training.seed + fold)
    seconds = result.metrics["baseline_seconds"]
    share = f" = {100 * seconds / train_seconds:.1f}% of the model's training time {train_seconds:.1f} s" \
        if train_seconds else ""
    logger.info("fold %d%s: logistic-regression baseline (%s features, %s encoding, C=%g chosen on val) took "
                "%.2f s%s; test macro-F1 %.4f", fold, f" task {task!r}" if task else "", features, encoding, result.C,
                seconds, share, result.metrics["macro_f1"])
    return result


def compute_multitask_baseline(opts, fold: int, cells: Mapping[str, EncodedCells], datasets: Mapping[str, Any],
                               config, tasks, class_weights, train_seconds: float | None = None
                               ) -> dict[str, tuple[BaselineResult, np.ndarray]] | None:
    """A multi-task fold's baselines: per task a logistic regression on the cells with that
    task's label in each split (rank 0 only); None with ``--baselines none``.

    Returns
    -------
    dict or None
        Task name -> (its :class:`BaselineResult`, the positions of its test cells in ``cells["test"]``).
    """
    from geneformer_peft.training.multitask import MISSING

    baselines = getattr(opts, "baselines", "logreg")
    check_baseline_options(baselines, getattr(opts, "baseline_features", "tokens"))
    if baselines == "none" or not distributed.is_main_process():
        return None
    out = {}
    for k, task in enumerate(tasks):
        task_cells, task_datasets, positions = {}, {}, {}
        for split, split_cells in cells.items():
            positions[split] = np.flatnonzero(split_cells.labels[:, k] != MISSING)
            task_cells[split] = split_cells.subset(positions[split], labels=split_cells.labels[positions[split], k],
                                                   name=f"{split_cells.name} {task.name}")
            dataset = datasets.get(split)
            task_datasets[split] = dataset.select(positions[split].tolist()) if dataset is not None else None
        if not all(len(c) for c in task_cells.values()):
            logger.warning("fold %d task %r: a split has no labelled cell; no baseline for this task", fold, task.name)
            continue
        out[task.name] = (_fit_baseline(opts, fold, task_cells, task_datasets, config, task.labels, class_weights[k],
                                        train_seconds, task=task.name), positions["test"])
    return out


def write_multitask_baseline(folder: Path, results: Mapping[str, tuple[BaselineResult, np.ndarray]], tasks,
                             test: EncodedCells, model_metrics: Mapping[str, Any], *, title: str | None = None) -> None:
    """A multi-task fold's baseline files: ``baseline_metrics.json`` (as the model's metrics.json:
    means over tasks, ``<task>.<metric>``, ``tasks``), ``baseline_predictions.csv`` (per task
    ``<task>_true``, ``<task>_pred``; empty where the task's label is missing) and
    ``baseline_per_class_f1_<task>.png`` per task."""
    from geneformer_peft.training.multitask import MISSING, combine_task_metrics, task_file

    import pandas as pd

    folder = Path(folder)
    columns: dict[str, Any] = {"index": list(test.index)}
    per_task = {}
    for k, task in enumerate(tasks):
        names = np.asarray(task.labels, dtype=object)
        truth = test.labels[:, k]
        columns[f"{task.name}_true"] = np.where(truth == MISSING, "", names[np.maximum(truth, 0)])
        predicted = np.full(len(test), "", dtype=object)
        if task.name in results:
            result, positions = results[task.name]
            predicted[positions] = names[result.predictions]
            metrics = dict(result.metrics)
            metrics["n_missing"] = int(len(test) - len(positions))
            per_task[task.name] = metrics
            if task.name in model_metrics.get("tasks", {}):
                plot_per_class_f1(model_metrics["tasks"][task.name]["per_class"], result.metrics["per_class"],
                                  folder / task_file("baseline_per_class_f1", task.name, ".png"),
                                  label_names=list(task.labels),
                                  model_name=method_display_name(model_metrics.get("prompt_type", "")),
                                  baseline_name=BASELINE_NAME, title=f"{title}: {task.name}" if title else task.name)
        columns[f"{task.name}_pred"] = predicted
    metrics = combine_task_metrics(per_task, n_cells=len(test))
    first = next(iter(per_task.values()), {})
    for key in ("baseline", "features", "encoding"):
        if key in first:
            metrics[key] = first[key]
    metrics["baseline_seconds"] = float(sum(m.get("baseline_seconds", 0.0) for m in per_task.values()))
    write_json(folder / BASELINE_METRICS_FILE, metrics)
    from geneformer_peft.evaluation.outputs import write_text
    import io

    buffer = io.StringIO()
    pd.DataFrame(columns).to_csv(buffer, index=False)
    write_text(folder / BASELINE_PREDICTIONS_FILE, buffer.getvalue())


def add_task_summaries(summary: dict[str, Any], fold_metrics: Sequence[Mapping[str, Any]],
                       baseline_metrics: Sequence[Mapping[str, Any] | None], fold_ids: Sequence[Any],
                       prompt_type: str, tasks: Sequence[str]) -> str:
    """A multi-task run's summary per task under ``summary["tasks"][task]`` (as a single-task
    summary: metrics, and with baselines ``baseline`` and ``comparison``); return the tasks'
    comparison tables."""
    tables = []
    summary["tasks"] = {}
    for task in tasks:
        present = [(m["tasks"][task], b.get("tasks", {}).get(task) if b is not None else None, f)
                   for m, b, f in zip(fold_metrics, baseline_metrics, fold_ids) if task in m.get("tasks", {})]
        if not present:
            continue
        model, base, ids = (list(x) for x in zip(*present))
        entry = summarize_folds(model, ids)
        table = add_baseline_summary(entry, model, base, ids, prompt_type)
        if table:
            tables.append(f"task {task}:\n{table}")
        summary["tasks"][task] = entry
    return "\n\n".join(tables)


def write_fold_baseline(folder: Path, result: BaselineResult, test: EncodedCells, label_names: Sequence[str],
                        model_metrics: Mapping[str, Any], *, title: str | None = None) -> None:
    """Write the baseline's files into a (temporary) fold folder."""
    folder = Path(folder)
    write_predictions_csv(folder / BASELINE_PREDICTIONS_FILE, cell_index=test.index, label_names=label_names,
                          pred_ids=result.predictions, probabilities=result.probabilities, true_ids=test.labels)
    write_json(folder / BASELINE_METRICS_FILE, result.metrics)
    plot_per_class_f1(model_metrics["per_class"], result.metrics["per_class"], folder / BASELINE_FIGURE_FILE,
                      label_names=label_names,
                      model_name=method_display_name(model_metrics.get("prompt_type", "")),
                      baseline_name=BASELINE_NAME, title=title)


def read_fold_baseline(fold_dir: Path) -> dict[str, Any] | None:
    """A finished fold's ``baseline_metrics.json``, or None when it has none."""
    path = Path(fold_dir) / BASELINE_METRICS_FILE
    if not path.is_file():
        return None
    return json.loads(path.read_text(encoding="utf-8"))


def add_baseline_summary(summary: dict[str, Any], fold_metrics: Sequence[Mapping[str, Any]],
                         baseline_metrics: Sequence[Mapping[str, Any] | None], fold_ids: Sequence[Any],
                         prompt_type: str) -> str:
    """Add ``baseline`` and ``comparison`` to a run summary; return the comparison table.

    Folds without a baseline (finished before baselines existed, or ``--baselines none``)
    are left out of the comparison, with a warning; with none at all nothing is added and
    the returned text is empty.
    """
    paired = [(m, b, f) for m, b, f in zip(fold_metrics, baseline_metrics, fold_ids) if b is not None]
    if not paired:
        return ""
    if len(paired) < len(fold_ids):
        logger.warning("folds %s have no %s (finished before the baseline ran); the comparison covers folds %s",
                       [f for b, f in zip(baseline_metrics, fold_ids) if b is None], BASELINE_METRICS_FILE,
                       [f for _, _, f in paired])
    model, base, ids = (list(x) for x in zip(*paired))
    summary["baseline"] = summarize_folds(base, ids)
    summary["baseline"]["name"] = BASELINE_NAME
    summary["baseline"]["features"] = base[0].get("features")
    comparison = paired_comparison(model, base, ids, model_name=method_display_name(prompt_type))
    summary["comparison"] = comparison
    logger.info("%s", comparison["sentence"])
    return format_comparison_table(comparison)
