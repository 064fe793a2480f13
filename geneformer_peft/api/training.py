"""``gp.finetune``: the ``finetune`` command for a notebook, and the result it returns
(summary tables, each fold's outputs, figures)."""
from __future__ import annotations

import argparse
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

from geneformer_peft.api._session import prepare
from geneformer_peft.errors import DataError

logger = logging.getLogger(__name__)

__all__ = ["FinetuneResult", "FoldResult", "finetune", "finetune_defaults", "open_run"]

PathLike = str | Path


def _parser() -> argparse.ArgumentParser:
    from geneformer_peft.commands import finetune as command

    parser = argparse.ArgumentParser(add_help=False)
    command.add_arguments(parser)
    return parser


def finetune_defaults() -> dict[str, Any]:
    """Every option of ``geneformer-peft finetune`` (by its destination name) -> the command's default."""
    return {a.dest: a.default for a in _parser()._actions}


def _method_text(method: str | Sequence[str] | None) -> str | None:
    if method is None or isinstance(method, str):
        return method
    return ",".join(method)


def finetune(
    data: PathLike,
    *,
    model: PathLike,
    method: str | Sequence[str] | None = None,
    folds: Sequence[int] | None = None,
    output: PathLike = "save",
    config: PathLike | None = None,
    epochs: int = 10,
    lr: float = 5e-4,
    batch_size: int = 32,
    label_column: str | Sequence[str] = "cell_type",
    seed: int = 0,
    device: str = "auto",
    overwrite: bool = False,
    progress: bool = True,
    **options: Any,
) -> FinetuneResult:
    """K-fold fine-tuning with per-fold outputs (``geneformer-peft finetune``).

    Parameters
    ----------
    data
        The fold layout folder ``<data_path>/<dataset_name>`` (as :func:`geneformer_peft.split`
        returns), holding ``<i>/<dataset_name>_{train,val,test}<i>.dataset``.
    model
        Pretrained checkpoint folder (``config.json`` + weights).
    method
        PEFT method(s): ``"lora"``, ``"Gene_token_prompt"``, ``["Gene_token_prompt", "lora"]``
        (or ``"Gene_token_prompt,lora"``); ``""`` for full fine-tuning; ``None`` (default) the
        ``prompt_type`` of ``config`` or of the checkpoint's ``config.json``.
    folds
        Folds to run, e.g. ``[0, 1]`` (default: every fold found).
    output
        Where run folders go; the run's folder is ``<output>/<method>/<dataset_name>``.
    config
        A ``config.json`` whose PEFT keys apply (default: the checkpoint's own).
    epochs, lr, batch_size, label_column, seed, device
        As the command's ``--epoch``, ``--lr``, ... with the same defaults. ``label_column`` may
        list several columns (``["cell_type", "disease"]``): one multi-task model, a head per task
        (``task_weights=`` weighs their losses; docs/multitask.md).
    overwrite
        Redo folds that finished earlier (default: skip those whose recorded settings match).
    progress
        Progress bars (``tqdm.auto``: widgets in a notebook).
    **options
        Any other option of ``geneformer-peft finetune`` under its name without dashes, with the
        command's default when left out: ``warmup_ratio``, ``weight_decay``, ``lr_schedule``,
        ``layer_decay``, ``lr_end``, ``early_stopping_patience``, ``select_epoch_by``, ``sampler``,
        ``class_weighting``, ``max_length``, ``precision``, ``num_threads``, ``baselines``,
        ``token_dictionary``, ``random_init``, ``out_prefix``, ``use_prompt``, ... An unknown name or
        a value outside the command's choices is refused, naming it.

    Returns
    -------
    FinetuneResult
        The run's summary, baseline comparison, folds and figures.
    """
    from geneformer_peft.commands.finetune import options_from_args
    from geneformer_peft.training.cross_validation import run_cross_validation

    prepare()
    parser = _parser()
    actions = {a.dest: a for a in parser._actions}
    explicit = {"epochs": epochs, "lr": lr, "batch_size": batch_size, "label_column": label_column, "seed": seed,
                "device": device, "overwrite": overwrite}
    reserved = {"dataset_name", "data_path", "model_path", "output_path", "prompt_type", "no_progress", "config"}
    unknown = sorted(k for k in options if k not in actions or k in reserved or k in explicit)
    if unknown:
        allowed = sorted(set(actions) - reserved - set(explicit))
        raise TypeError(f"finetune() got option(s) {unknown} it does not take; expected data=, model=, method=, "
                        f"folds=, output=, config=, {', '.join(f'{k}=' for k in explicit)} or one of {allowed}")
    for name, value in list(options.items()):  # a str where the command parses one: parsed as the command does
        convert = actions[name].type
        if isinstance(value, str) and convert is not None and convert is not str:
            try:
                options[name] = convert(value)
            except (TypeError, ValueError, argparse.ArgumentTypeError) as error:
                raise DataError(f"finetune {name}={value!r}: {error}") from None
    for name, value in {**explicit, **options}.items():
        choices = actions[name].choices
        if choices is not None and value not in choices:
            raise DataError(f"finetune {name}={value!r}; expected one of {list(choices)}")
    data = Path(data)
    if not data.is_dir():
        raise DataError(f"finetune data={data}: no such folder; expected the fold layout folder "
                        "<data_path>/<dataset_name> (what gp.split returns)")
    values = {a.dest: a.default for a in parser._actions if a.dest != "help"}
    values.update(explicit)
    values.update(options)
    values.update(dataset_name=data.name, data_path=data.parent, model_path=Path(model), output_path=Path(output),
                  prompt_type=_method_text(method), config=None if config is None else Path(config),
                  folds=None if folds is None else [int(f) for f in folds], no_progress=not progress)
    summary = run_cross_validation(options_from_args(argparse.Namespace(**values)))
    return FinetuneResult(Path(summary["run_dir"]), summary=summary)


def open_run(run_dir: PathLike) -> FinetuneResult:
    """The result of a finished run read back from its folder (``<output>/<method>/<dataset_name>``)."""
    from geneformer_peft.evaluation.outputs import SUMMARY_JSON

    run_dir = Path(run_dir)
    path = run_dir / SUMMARY_JSON
    if not path.is_file():
        raise DataError(f"{run_dir}: no {SUMMARY_JSON}; expected the folder of a finished fine-tuning run "
                        "(<output>/<method>/<dataset_name>)")
    return FinetuneResult(run_dir, summary=json.loads(path.read_text(encoding="utf-8")))


def _read_json(path: Path) -> Any:
    return json.loads(path.read_text(encoding="utf-8"))


@dataclass
class FoldResult:
    """One fold's outputs (``docs/outputs.md``), read on first use."""

    folder: Path

    @cached_property
    def metrics(self) -> dict[str, Any]:
        """``metrics.json``: test metrics, per-class report, confusion matrix, parameter counts."""
        return _read_json(self.folder / "metrics.json")

    @cached_property
    def history(self) -> list[dict[str, Any]]:
        """``history.json``: one record per epoch (losses, validation macro-F1, rate)."""
        return _read_json(self.folder / "history.json")

    @cached_property
    def predictions(self):
        """``predictions.csv`` as a DataFrame (one row per test cell, a probability column per class)."""
        import pandas as pd

        return pd.read_csv(self.folder / "predictions.csv")

    @cached_property
    def baseline_metrics(self) -> dict[str, Any] | None:
        """``baseline_metrics.json`` (the logistic-regression baseline on this fold), or None."""
        path = self.folder / "baseline_metrics.json"
        return _read_json(path) if path.is_file() else None

    @property
    def model(self):
        """The fine-tuned classifier (loaded anew on each access; PEFT-only folds need :meth:`load_model`)."""
        return self.load_model()

    def load_model(self, base_model: PathLike | None = None):
        """The fine-tuned classifier, from its full weights or its PEFT weights on ``base_model``."""
        from geneformer_peft.models.loading import load_fold_model

        return load_fold_model(self.folder, base_model)

    def plot_training_curves(self):
        """Losses and validation macro-F1 per epoch (a matplotlib Figure; the star: the epoch kept)."""
        from geneformer_peft.evaluation.plots import plot_training_curves

        return _figure(plot_training_curves(self.history, None, best_epoch=self.metrics.get("best_epoch"),
                                            title=f"fold {self.folder.name}"))

    def plot_confusion_matrix(self, *, normalize: bool = True, task: str | None = None):
        """The test confusion matrix (a matplotlib Figure); of a multi-task fold, task ``task``'s
        (default: the first task's)."""
        from geneformer_peft.evaluation.plots import plot_confusion_matrix

        m, title = self.metrics, f"fold {self.folder.name}: confusion matrix"
        if "tasks" in m:  # a multi-task fold (docs/multitask.md)
            tasks = list(m["tasks"])
            name = tasks[0] if task is None else task
            if name not in m["tasks"]:
                raise KeyError(f"no task {name!r} in {self.folder}; its tasks are {tasks}")
            m, title = m["tasks"][name], f"{title} of {name}"
        elif task is not None:
            raise KeyError(f"{self.folder} is a single-task fold; leave task= out")
        return _figure(plot_confusion_matrix(m["confusion_matrix"], m["labels"], None, normalize=normalize,
                                             title=title))


def _figure(figure):
    if figure is None:
        raise ImportError("figures need matplotlib: pip install 'geneformer-peft[plot]'")
    return figure


class FinetuneResult:
    """A fine-tuning run: its folder, summary and folds.

    Attributes
    ----------
    run_dir
        ``<output>/<method>/<dataset_name>``.
    summary_dict
        What ``summary.json`` holds (the cross-fold summary, baseline and comparison).
    """

    def __init__(self, run_dir: Path, *, summary: dict[str, Any]) -> None:
        self.run_dir = Path(run_dir)
        self.summary_dict = summary

    @property
    def fold_ids(self) -> list[int]:
        """The folds of this run."""
        return [int(f) for f in self.summary_dict["fold_ids"]]

    @property
    def table(self) -> str:
        """The summary table as the command prints it."""
        from geneformer_peft.evaluation.outputs import format_summary_table

        return self.summary_dict.get("table") or format_summary_table(self.summary_dict)

    @property
    def summary(self):
        """Per-fold test metrics: a DataFrame with one row per fold, one column per scalar metric."""
        return _per_fold_frame(self.summary_dict)

    @property
    def baseline(self):
        """The logistic-regression baseline's per-fold test metrics (a DataFrame), or None without one."""
        base = self.summary_dict.get("baseline")
        return None if not base else _per_fold_frame(base)

    @property
    def comparison(self):
        """Model against baseline per metric (a DataFrame: model and baseline means, the paired
        difference's mean and sd, folds each side wins, the test and its p-value), or None."""
        import pandas as pd

        comparison = self.summary_dict.get("comparison")
        if not comparison:
            return None
        rows = {name: {k: v for k, v in entry.items() if not isinstance(v, (dict, list))}
                for name, entry in comparison["metrics"].items()}
        frame = pd.DataFrame.from_dict(rows, orient="index")
        frame.index.name = "metric"
        frame.attrs["sentence"] = comparison.get("sentence")
        return frame

    @property
    def sentence(self) -> str | None:
        """The plain sentence comparing model and baseline."""
        return (self.summary_dict.get("comparison") or {}).get("sentence")

    def fold(self, i: int) -> FoldResult:
        """Fold ``i``'s outputs."""
        if int(i) not in self.fold_ids:
            raise KeyError(f"fold {i} is not in this run; its folds are {self.fold_ids}")
        return FoldResult(self.run_dir / str(int(i)))

    def plot_summary(self, metric: str = "macro_f1"):
        """``metric`` per fold, the model beside the baseline (a matplotlib Figure)."""
        import numpy as np

        from geneformer_peft.evaluation.plots import new_figure

        frame, base = self.summary, self.baseline
        if metric not in frame.columns:
            raise KeyError(f"no metric {metric!r}; expected one of {list(frame.columns)}")
        figure = _figure(new_figure(6.0, 3.5))
        axes = figure.add_subplot()
        x = np.arange(len(frame))
        width = 0.4 if base is not None else 0.8
        axes.bar(x - (width / 2 if base is not None else 0), frame[metric], width, label="model")
        if base is not None and metric in base.columns:
            axes.bar(x + width / 2, base[metric], width, label="logistic regression")
        axes.set_xticks(x, labels=[f"fold {f}" for f in frame.index])
        axes.set_ylabel(metric)
        axes.set_ylim(0.0, 1.02 if frame[metric].max() <= 1 else None)
        axes.legend(loc="lower right")
        axes.set_title(f"{metric} per fold ({self.run_dir.parent.name})")
        return figure

    def plot_training_curves(self, fold: int | None = None):
        """Training curves of ``fold`` (default: the first)."""
        return self.fold(self.fold_ids[0] if fold is None else fold).plot_training_curves()

    def plot_confusion_matrix(self, fold: int | None = None, *, normalize: bool = True, task: str | None = None):
        """Confusion matrix of ``fold`` (default: the first); of a multi-task run, task ``task``'s
        (default: the first task's)."""
        return self.fold(self.fold_ids[0] if fold is None else fold).plot_confusion_matrix(normalize=normalize,
                                                                                          task=task)

    def _repr_html_(self) -> str:  # a notebook shows the table
        return f"<p>{self.run_dir}</p><pre>{self.table}</pre>"

    def __repr__(self) -> str:
        return f"FinetuneResult({str(self.run_dir)!r}, folds={self.fold_ids})"


def _per_fold_frame(summary: dict[str, Any]):
    import pandas as pd

    rows = {}
    for column, fold in zip(summary["folds"], summary["fold_ids"]):
        rows[int(fold)] = {name: entry["values"].get(column) for name, entry in summary["metrics"].items()}
    frame = pd.DataFrame.from_dict(rows, orient="index")
    frame.index.name = "fold"
    return frame
