"""Evaluation stage: inference over a split, metrics, the run's write-once outputs and
summaries, figures, and prediction on new cells with a fine-tuned fold.

Names are loaded on first use (``from geneformer_peft.evaluation import X`` imports only the
module holding ``X``).
"""
from geneformer_peft._lazy import lazy_face

#: public name -> module of this package that defines it
_WHERE = {
    "BASELINE_FEATURES": "baseline",
    "BASELINE_METHODS": "baseline",
    "DEFAULT_C_GRID": "baseline",
    "EXPRESSION_IDS": "baseline",
    "EXPRESSION_VALUES": "baseline",
    "N_COUNTS": "baseline",
    "BaselineResult": "baseline",
    "expression_features": "baseline",
    "fold_baseline": "baseline",
    "run_logreg_baseline": "baseline",
    "select_and_fit": "baseline",
    "special_token_ids": "baseline",
    "token_features": "baseline",
    "BASELINE_NAME": "comparison",
    "MIN_FOLDS_WILCOXON": "comparison",
    "comparison_rows": "comparison",
    "comparison_sentence": "comparison",
    "format_comparison_table": "comparison",
    "method_display_name": "comparison",
    "paired_comparison": "comparison",
    "plot_per_class_f1": "comparison_plots",
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
    "starred_epoch": "plots",
    "UNASSIGNED": "prediction",
    "predict_cells": "prediction",
}

__getattr__, __dir__, __all__ = lazy_face(__name__, _WHERE)
