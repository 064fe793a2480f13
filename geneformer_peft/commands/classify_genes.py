"""Gene classification: label every gene token of the cells with its gene's class (from
--gene_classes, a JSON {class: [gene ids]}), fine-tune a token-classification head with any
PEFT method (or fully), and test on held-out genes. Genes, not cells, are split into folds.

Writes <output_path>/<method>/<k>/ (gene_predictions.csv: each test gene's mean class
probability over its occurrences; metrics.json with ROC AUC (2 classes) or macro-F1;
confusion_matrix.png; roc.png) and summary.json / summary.csv (mean ± sd over folds).
Finished folds are skipped on a re-run.

Example (the shipped example's cells and checkpoint):
  geneformer-peft classify-genes --gene_classes classes.json \\
      --input example_py/data/synthetic/0/synthetic_train0.dataset \\
      --model_path Pretrain_ckpts/geneformer-tiny-example --n_folds 5 --output_path save/genes
"""
from __future__ import annotations

import argparse
import logging
from pathlib import Path

from geneformer_peft.commands._common import (
    CHECKPOINT,
    DATASET,
    OUTPUT_FOLDER,
    SEED,
    file_path,
    float_in,
    fold_list,
    int_in,
    non_negative_float,
    non_negative_int,
    positive_float,
    positive_int,
)

logger = logging.getLogger(__name__)

HELP = "Gene classification with a token-classification head (gene folds; any PEFT method)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    p = parser.add_argument
    p("--gene_classes", type=file_path("a JSON file {class: [gene ids]}"), required=True, help="JSON {class: [gene ids]} (Ensembl ids of the vocabulary).")
    p("--input", type=DATASET, required=True, help="Tokenized cells (a saved dataset with input_ids).")
    p("--model_path", type=CHECKPOINT, required=True, help="Pretrained checkpoint folder.")
    p("--output_path", type=OUTPUT_FOLDER, required=True, help="Where the run folder <method>/ goes.")
    p("--n_folds", type=int_in(2), default=5, help="Gene folds (%(default)s).")
    p("--folds", type=fold_list, default=None, help="Folds to run, e.g. 0,1 (default: all).")
    p("--config", type=Path, default=None, help="A config.json whose PEFT keys apply (as in finetune).")
    p("--prompt_type", default=None, help="Override prompt_type; '' for full fine-tuning.")
    p("--token_dictionary", type=Path, default=None,
      help="Token dictionary of the cells: a .json {token: id} (token_dictionary.json), Geneformer's .pkl or a "
           "tokenizer.json (default: the checkpoint's tokenizer.json).")
    p("--max_cells", type=positive_int, default=None, help="Use only the first N cells.")
    p("--epoch", "--epochs", dest="epochs", type=positive_int, default=3, help="Epochs per fold (%(default)s).")
    p("--batch_size", type=positive_int, default=16, help="Cells per batch (%(default)s).")
    p("--lr", type=positive_float, default=5e-4, help="Peak learning rate (%(default)s).")
    p("--weight_decay", type=non_negative_float, default=0.001, help="AdamW weight decay (%(default)s).")
    p("--warmup_steps", type=non_negative_int, default=0, help="Warmup steps (0: --warmup_ratio of all steps).")
    p("--warmup_ratio", type=float_in(0, 1, high_open=True), default=0.05, help="Warmup fraction (%(default)s).")
    p("--lr_schedule", default="linear", choices=["linear", "cosine", "constant"], help="(%(default)s)")
    p("--layer_decay", type=float_in(0, 1, low_open=True), default=None, help="Layer-wise learning-rate decay (as in finetune).")
    p("--lr_end", type=non_negative_float, default=0.0, help="Rate at the end of the schedule (%(default)s).")
    p("--early_stopping_patience", type=non_negative_int, default=3,
      help="Stop after this many epochs without a better validation score; 0 = never (%(default)s).")
    p("--max_length", type=positive_int, default=None, help="Keep each cell's first N tokens (default: model's maximum).")
    p("--seed", type=SEED, default=0, help="Seed of the gene folds and of training (%(default)s).")
    p("--device", default="auto", help="auto, cpu, cuda or cuda:N (%(default)s).")
    p("--precision", default="fp32", choices=["fp32", "bf16", "fp16"], help="(%(default)s)")
    p("--num_threads", type=positive_int, default=None, help="CPU threads of torch (default: torch's).")
    p("--allow_low_gene_overlap", action="store_true",
      help="Go on when fewer than half of the cells' genes have pretrained rows in the model (default: refuse).")
    p("--overwrite", action="store_true", help="Redo finished folds.")
    p("--no_progress", action="store_true", help="No progress bars.")


def run(args: argparse.Namespace) -> int:
    if args.num_threads:
        import torch

        torch.set_num_threads(args.num_threads)
    from geneformer_peft.files import check_path
    from geneformer_peft.training.arguments import TrainingArguments
    from geneformer_peft.training.gene_classification import GeneClassOptions, run_gene_classification

    check_path(args.gene_classes, "file", "a JSON file {class: [gene ids]}", flag="--gene_classes")
    check_path(args.input, "folder", "a saved dataset folder of tokenized cells", flag="--input")
    training = TrainingArguments(
        epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, weight_decay=args.weight_decay,
        warmup_steps=args.warmup_steps, warmup_ratio=args.warmup_ratio, lr_schedule=args.lr_schedule,
        layer_decay=args.layer_decay, lr_end=args.lr_end, early_stopping_patience=args.early_stopping_patience,
        max_length=args.max_length, seed=args.seed, device=args.device, precision=args.precision,
        progress=not args.no_progress)
    opts = GeneClassOptions(gene_classes=args.gene_classes, input=args.input, model_path=args.model_path,
                            output_path=args.output_path, n_folds=args.n_folds,
                            folds=args.folds, config_path=args.config,
                            prompt_type=args.prompt_type, token_dictionary=args.token_dictionary,
                            max_cells=args.max_cells, overwrite=args.overwrite, training=training,
                            allow_low_gene_overlap=args.allow_low_gene_overlap)
    summary = run_gene_classification(opts)
    if not logging.getLogger("geneformer_peft").isEnabledFor(logging.INFO):
        print(f"Summary over gene folds ({summary['run_dir']}):\n{summary['table']}")
    return 0
