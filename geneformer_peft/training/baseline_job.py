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
    from geneformer_peft.training.cross_validation import vocabulary_source

    vocabulary = vocabulary_source(opts)
    specials = special_token_ids(load_token_dictionary(vocabulary) if vocabulary is not None else None)
    names = [config.id2label[i] for i in range(config.num_labels)]
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
    logger.info("fold %d: logistic-regression baseline (%s features, %s encoding, C=%g chosen on val) took %.2f s%s; "
                "test macro-F1 %.4f", fold, features, encoding, result.C, seconds, share, result.metrics["macro_f1"])
    return result


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
