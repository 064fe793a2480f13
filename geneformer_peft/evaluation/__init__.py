"""Evaluation stage: inference over a split, metrics, the run's write-once outputs and
summaries, figures, and prediction on new cells with a fine-tuned fold.

Names are loaded on first use (``from geneformer_peft.evaluation import X`` imports only the
module holding ``X``).
"""
from __future__ import annotations

import importlib
from typing import Any

#: public name -> module of this package that defines it
_WHERE: dict[str, str] = {
    "predict_logits": "inference",
    "softmax": "inference",
    "classification_metrics": "metrics",
    "macro_f1": "metrics",
    "SCALAR_METRICS": "metrics",
    "FOLD_DONE_MARKER": "outputs",
    "SUMMARY_JSON": "outputs",
    "SUMMARY_CSV": "outputs",
    "write_json": "outputs",
    "write_pickle": "outputs",
    "write_text": "outputs",
    "write_predictions_csv": "outputs",
    "predictions_frame": "outputs",
    "atomic_directory": "outputs",
    "mark_fold_done": "outputs",
    "is_fold_done": "outputs",
    "summarize_folds": "outputs",
    "summary_frame": "outputs",
    "write_summary": "outputs",
    "format_summary_table": "outputs",
    "plotting_available": "plots",
    "plot_confusion_matrix": "plots",
    "plot_training_curves": "plots",
    "predict_cells": "prediction",
}

__all__ = sorted(_WHERE)


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_WHERE[name]}"), name)


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
