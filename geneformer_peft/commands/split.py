"""Split a tokenized dataset into stratified cross-validation folds (reference layout).

Writes <output_dir>/<dataset_name>/<i>/<dataset_name>_{train,val,test}<i>.dataset for
i = 0..n_folds-1 plus <output_dir>/<dataset_name>/split_info.json. The test sets partition
the cells (stratified by label); validation cells are carved per class from the rest.
Classes too small to be in every test set, or to give validation cells, are kept and
reported by name.

Example:
  geneformer-peft split --input cells.dataset --dataset_name cellbench --output_dir data --n_folds 5
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from geneformer_peft.commands._common import DATASET, OUTPUT_FOLDER, SEED, float_in, int_in

logger = logging.getLogger(__name__)

HELP = "split a tokenized dataset into stratified train/val/test folds"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the options of ``split``."""
    parser.add_argument("--input", required=True, type=DATASET, help="Saved dataset (from `tokenize`).")
    parser.add_argument("--dataset_name", required=True, help="Name used in the fold directory and file names.")
    parser.add_argument("--output_dir", required=True, type=OUTPUT_FOLDER, help="The data_path under which <dataset_name>/<i>/ is written.")
    parser.add_argument("--n_folds", type=int_in(2), default=5, help="Number of folds; the test sets partition the cells.")
    parser.add_argument("--label_column", default="cell_type", help="Label column to stratify on.")
    parser.add_argument("--seed", type=SEED, default=0, help="Seed of the shuffles.")
    parser.add_argument("--val_fraction", type=float_in(0, 1, high_open=True), default=0.1, help="Fraction of each fold's non-test cells (per class) used for validation.")
    parser.add_argument("--overwrite", action="store_true", help="Replace existing folds of this dataset name.")


def run(args: argparse.Namespace) -> int:
    """Run ``split``."""
    from geneformer_peft.commands._common import guarded
    from geneformer_peft.data.dataset_io import load_saved_dataset
    from geneformer_peft.data.folds import split_folds

    args.output = args.output_dir / args.dataset_name  # the folder made: <output_dir>/<dataset_name>/
    with guarded(args, "split", not_settings=("output_dir",), flag="--output_dir/--dataset_name") as tmp:
        dataset = load_saved_dataset(args.input)
        split_folds(
            dataset,
            dataset_name=args.dataset_name,
            output_dir=args.output_dir,
            n_folds=args.n_folds,
            label_column=args.label_column,
            seed=args.seed,
            val_fraction=args.val_fraction,
            overwrite=args.overwrite,
            into=tmp,
        )
    logger.info("wrote %d folds under %s", args.n_folds, args.output_dir / args.dataset_name)
    return 0
