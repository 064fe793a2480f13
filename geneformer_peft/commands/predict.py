"""Predict cell types of new tokenized cells with a fine-tuned fold.

--model_path is a fold folder written by the fine-tuning job: its full model
(pytorch_model.bin / model.safetensors), or, with --base_model, its PEFT-only weights
(peft_model.safetensors) applied on the base checkpoint. Writes a CSV like predictions.csv;
without a label column in the input the ground-truth columns are left out.

Example:
  geneformer-peft predict --model_path save/lora/NSCLC/0 --input new_cells.dataset --output preds.csv
"""
from __future__ import annotations

import argparse
import logging
from pathlib import Path

from geneformer_peft.commands._common import CHECKPOINT, DATASET, file_path, float_in, folder_path, positive_int

logger = logging.getLogger(__name__)

HELP = "predict with a fine-tuned fold on new tokenized cells"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    p = parser.add_argument
    p("--model_path", required=True, type=folder_path("a fold folder of a fine-tuning run"), help="Fold folder of a fine-tuning run.")
    p("--base_model", type=CHECKPOINT, default=None,
      help="Base checkpoint: apply the fold's peft_model.safetensors on it instead of loading the full model.")
    p("--input", required=True, type=DATASET, help="Tokenized cells (a saved datasets.Dataset).")
    p("--output", required=True, type=file_path("a CSV file to write"), help="CSV to write.")
    p("--label_column", default="cell_type", help="Ground-truth column, used when present (%(default)s).")
    p("--batch_size", type=positive_int, default=64, help="Cells per batch (%(default)s).")
    p("--max_length", type=positive_int, default=None,
      help="Keep each cell's first N genes (default: the fold's max_length from its config.json).")
    p("--unassign_threshold", type=float_in(0, 1), default=None,
      help="Label a cell 'Unassigned' when its top class probability is below this (scBERT's recipe; any model).")
    p("--device", default="auto", help="auto, cpu, cuda (%(default)s).")
    p("--allow_low_gene_overlap", action="store_true",
      help="Go on when fewer than half of the input's genes have pretrained rows in the model (default: refuse).")
    p("--allow_other_base", action="store_true",
      help="Apply the fold's PEFT weights on a --base_model other than the one it was trained on (default: refuse, "
           "comparing SHA-256 with the fold's provenance.json).")
    p("--overwrite", action="store_true", help="Replace an existing --output.")


def run(args: argparse.Namespace) -> int:
    frame, metrics = write_predictions(args)
    print(f"{len(frame)} cells -> {args.output}")
    if metrics is not None and "accuracy" in metrics:
        print(f"accuracy {metrics['accuracy']:.4f}, macro-F1 {metrics['macro_f1']:.4f}"
              + (" (means over the tasks)" if "tasks" in metrics else ""))
        for task, entry in metrics.get("tasks", {}).items():  # a multi-task fold
            print(f"  {task}: accuracy {entry['accuracy']:.4f}, macro-F1 {entry['macro_f1']:.4f} "
                  f"({entry['n_cells']} labelled cells)")
    return 0


def write_predictions(args: argparse.Namespace, cells=None):
    """Predict and write ``args.output`` through the command's run-safety guard (lock, the file
    whole or absent, provenance, changed settings refused); ``gp.predict(output=...)`` writes
    through this too.

    Parameters
    ----------
    args : argparse.Namespace
        The command's options (``args.input``: the input's path, or ``None`` for ``cells``).
    cells : datasets.Dataset or callable, optional
        Tokenized cells in memory (or a function making them, called inside the guard), predicted
        instead of ``args.input``.

    Returns
    -------
    frame, metrics
        As :func:`geneformer_peft.evaluation.prediction.predict_cells`.
    """
    from geneformer_peft.commands._common import guarded
    from geneformer_peft.data.dataset_io import load_saved_dataset
    from geneformer_peft.evaluation.prediction import predict_cells

    with guarded(args, "predict", inputs=("input", "model_path", "base_model"), directory=False) as tmp:
        dataset = load_saved_dataset(args.input) if cells is None else cells() if callable(cells) else cells
        return predict_cells(args.model_path, dataset, output=tmp, base_model=args.base_model,
                             label_column=args.label_column, batch_size=args.batch_size, device=args.device,
                             max_length=args.max_length, unassign_threshold=args.unassign_threshold,
                             allow_low_gene_overlap=args.allow_low_gene_overlap,
                             allow_other_base=args.allow_other_base)
