"""K-fold PEFT fine-tuning of a Geneformer checkpoint on data in the reference fold layout.

Reads <data_path>/<dataset_name>/<i>/<dataset_name>_{train,val,test}<i>.dataset, trains
each fold with the method of config.json (prompt_type) or --prompt_type, and writes
<output_path>/<out_prefix><prompt types joined by _>/<dataset_name>/<i>/ (predictions.csv,
metrics.json, model, peft_model.safetensors, plots) plus summary.json / summary.csv.
Finished folds are skipped on a re-run and an interrupted fold resumes from its last epoch,
both only with the settings that made them (each fold folder records them in provenance.json;
other settings are refused: pass --overwrite or another --output_path / --out_prefix). One job at
a time may use a run folder, and every selected fold's data is checked before the first trains
(docs/run_safety.md).

Example:
  geneformer-peft finetune --dataset_name NSCLC --data_path ./example_py/data \\
      --model_path /path/to/gf-12L-30M-i2048 \\
      --config Pretrain_ckpts/geneformer-12L-30M-prompt/config.json --epoch 3 --lr 5e-5
"""
from __future__ import annotations

import argparse
import logging
from pathlib import Path

from geneformer_peft.commands._common import (
    CHECKPOINT,
    OUTPUT_FOLDER,
    SEED,
    boolean,
    float_in,
    fold_list,
    folder_path,
    non_negative_float,
    non_negative_int,
    positive_float,
    positive_int,
)

logger = logging.getLogger(__name__)

HELP = "K-fold fine-tuning (LoRA, prompts, adapters or full) with per-fold outputs"


def add_arguments(parser: argparse.ArgumentParser, defaults: dict | None = None) -> None:
    """Options of the fine-tuning job (also used by example_py/cell_classification_prompt_fold.py)."""
    d = {"dataset_name": None, "data_path": None, "model_path": None, "output_path": Path("save"), **(defaults or {})}
    req = {name: d[name] is None for name in ("dataset_name", "data_path", "model_path")}
    p = parser.add_argument
    p("--dataset_name", default=d["dataset_name"], required=req["dataset_name"],
      help=f"Dataset name in the fold layout (default: {d['dataset_name']}).")
    p("--data_path", type=folder_path("the folder holding <dataset_name>/<i>/"), default=d["data_path"], required=req["data_path"],
      help=f"Folder holding <dataset_name>/<i>/ (default: {d['data_path']}).")
    p("--output_path", type=OUTPUT_FOLDER, default=d["output_path"], help="Where run folders go (default: %(default)s).")
    p("--out_prefix", default="", help="Prefix of the run folder name, e.g. 'try1_' -> try1_lora/.")
    p("--model_path", type=CHECKPOINT, default=d["model_path"], required=req["model_path"],
      help=f"Pretrained checkpoint folder: config.json + model.safetensors or pytorch_model.bin "
           f"(default: {d['model_path']}).")
    p("--config", type=Path, default=None,
      help="A config.json whose PEFT keys (prompt_type, lora_r, num_token, ...) apply, e.g. "
           "Pretrain_ckpts/geneformer-12L-30M-prompt/config.json (default: the checkpoint's own).")
    p("--prompt_type", default=None,
      help="Override prompt_type: comma-separated from lora, prefix_prompt, Gene_token_prompt, encoder_prompt; "
           "'' for full fine-tuning.")
    p("--use_prompt", type=boolean, nargs="?", const=True, default=None,
      help="true/false: false switches every PEFT module off (if_use_prompt); default: the config's.")
    p("--epoch", "--epochs", dest="epochs", type=positive_int, default=d.get("epochs", 10), help="Epochs per fold (%(default)s).")
    p("--lr", type=positive_float, default=d.get("lr", 5e-4),
      help="Peak learning rate, a float (%(default)s). `geneformer-peft finetune` defaults to 5e-4, set for the "
           "Geneformer checkpoints; the example script to 1e-2, set for its tiny example checkpoint.")
    p("--batch_size", type=positive_int, default=d.get("batch_size", 32), help="Cells per batch (%(default)s).")
    p("--eval_batch_size", type=positive_int, default=None, help="Cells per batch in evaluation (default: --batch_size).")
    p("--folds", type=fold_list, default=None, help="Folds to run, e.g. 0,1 (default: all found).")
    p("--label_column", default="cell_type",
      help="Label column of the datasets (%(default)s); several separated by commas, e.g. cell_type,disease, "
           "train one multi-task model: a shared encoder with one head per task (docs/multitask.md).")
    p("--task_weights", default=None,
      help="Multi-task loss: one weight per --label_column task, e.g. 1,0.5 (default: 1 each), or 'uncertainty' "
           "to learn them (Kendall et al.'s uncertainty weighting).")
    p("--pooling", default=None, choices=["first", "mean", "attention"],
      help="How a Geneformer classifier pools the genes' final states into the cell's: token 0, the mean, or "
           "learned attention weights (default: the config's classifier_pooling, 'first').")
    p("--seed", type=SEED, default=0, help="Random seed; same seed and data on CPU give identical metrics.")
    p("--device", default="auto", help="auto, cpu, cuda or cuda:N (%(default)s).")
    p("--precision", default="fp32", choices=["fp32", "bf16", "fp16"],
      help="fp32, or mixed precision bf16 (CUDA; optional on CPU) / fp16 (CUDA, with loss scaling).")
    p("--quantize", default=None, choices=["nf4", "int8"],
      help="Store the frozen encoder projections quantized under a PEFT method, computed in --precision: nf4 "
           "(4-bit NormalFloat with double quantisation, as QLoRA) or int8; needs the 'quant' extra "
           "(torchao). Default: off. See docs/recipes.md.")
    p("--warmup_steps", type=non_negative_int, default=0, help="Linear warmup steps (0: --warmup_ratio of all steps).")
    p("--warmup_ratio", type=float_in(0, 1, high_open=True), default=0.05, help="Warmup fraction of all steps when --warmup_steps is 0 "
                                                       "(%(default)s).")
    p("--weight_decay", type=non_negative_float, default=0.001, help="AdamW weight decay (%(default)s).")
    p("--lr_schedule", default="linear", choices=["linear", "cosine", "constant"], help="After warmup (%(default)s).")
    p("--layer_decay", type=float_in(0, 1, low_open=True), default=None,
      help="Layer-wise learning-rate decay D in (0, 1], e.g. 0.65: head at --lr, encoder layer i of N at "
           "lr*D^(N-i), embeddings at lr*D^(N+1) (default: off, every parameter at --lr).")
    p("--lr_end", type=non_negative_float, default=0.0,
      help="Rate at the end of the linear/cosine schedule instead of 0, e.g. 1e-10 (%(default)s).")
    p("--early_stopping_patience", type=non_negative_int, default=d.get("early_stopping_patience", 5),
      help="Stop after this many epochs without a better validation score (--select_epoch_by); "
           "0 = never (%(default)s).")
    p("--select_epoch_by", default=d.get("select_epoch_by", "macro_f1"), choices=["macro_f1", "loss"],
      help="The validation score that picks the epoch kept: macro_f1 (ties to the lower loss) or loss, "
           "the class-weighted cross-entropy (ties to the higher macro-F1) (%(default)s).")
    p("--sampler", default="balanced", choices=["balanced", "length", "random"],
      help="balanced: class-balanced draws grouped by length (reference + length grouping); "
           "length: length-grouped shuffling; random: plain shuffling (%(default)s).")
    p("--class_weighting", default="reference", choices=["reference", "none"],
      help="reference: cross-entropy weights (1 - n_c/N)^2; none: unweighted (%(default)s).")
    p("--max_length", type=positive_int, default=None, help="Keep each cell's first N genes (default: model's maximum).")
    p("--num_workers", type=non_negative_int, default=0, help="DataLoader workers (%(default)s).")
    p("--num_threads", type=positive_int, default=None,
      help="CPU threads of torch (default: one per core not kept busy by other processes, measured at the "
           "start and logged in run.log as 'torch threads: N (reason)'; never more than torch's default). "
           "Fix it for bit-identical reruns on machines whose load differs.")
    p("--gradient_checkpointing", action="store_true", help="Recompute activations in backward (less memory).")
    p("--no_frozen_cache", action="store_true",
      help="Do not cache the outputs of frozen, unprompted leading layers between epochs.")
    p("--save_format", default="bin", choices=["bin", "safetensors"],
      help="Fold model file: pytorch_model.bin (reference contract) or model.safetensors (%(default)s).")
    p("--token_dictionary", type=Path, default=None,
      help="The data's token dictionary (a token_dictionary.json {token: id}, Geneformer's token_dictionary.pkl "
           "or a tokenizer.json), written into "
           "every fold folder as tokenizer.json (default: the checkpoint's tokenizer.json, if any).")
    p("--random_init", action="store_true",
      help="Ablation: same architecture and method, random weights instead of the checkpoint's.")
    p("--overwrite", action="store_true",
      help="Redo folds that finished earlier, and interrupted folds started with other settings (default: skip "
           "finished folds whose recorded settings match, refuse those whose settings differ).")
    p("--baselines", default="logreg", choices=["logreg", "none"],
      help="logreg: per fold, a logistic regression on the same splits (C chosen on val, test read once), "
           "compared with the model in the summary; none: no baseline (%(default)s). See docs/baseline.md.")
    p("--baseline_features", default="tokens", choices=["tokens", "expression"],
      help="Baseline features: tokens (gene tokens weighted by 1/sqrt(rank)) or expression (log1p of counts "
           "normalised to 10,000; needs the columns expression_ids and expression_values) (%(default)s).")
    p("--allow_low_gene_overlap", action="store_true",
      help="Go on when fewer than half of the data's genes (or of its counts) have pretrained rows in the model "
           "(default: refuse; see the compatibility report, docs/own_data.md).")
    p("--no_progress", action="store_true", help="No progress bars.")


def options_from_args(args: argparse.Namespace):
    from geneformer_peft.training.arguments import TrainingArguments
    from geneformer_peft.training.cross_validation import RunOptions

    training = TrainingArguments(
        epochs=args.epochs, batch_size=args.batch_size, eval_batch_size=args.eval_batch_size, lr=args.lr,
        weight_decay=args.weight_decay, warmup_steps=args.warmup_steps, lr_schedule=args.lr_schedule,
        layer_decay=args.layer_decay, lr_end=args.lr_end, warmup_ratio=args.warmup_ratio,
        early_stopping_patience=args.early_stopping_patience, select_epoch_by=args.select_epoch_by,
        sampler=args.sampler, class_weighting=args.class_weighting, max_length=args.max_length,
        num_workers=args.num_workers,
        seed=args.seed, device=args.device, precision=args.precision, quantize=args.quantize,
        gradient_checkpointing=args.gradient_checkpointing, cache_frozen_layers=not args.no_frozen_cache,
        progress=not args.no_progress)
    return RunOptions(dataset_name=args.dataset_name, data_path=args.data_path, output_path=args.output_path,
                      model_path=args.model_path, out_prefix=args.out_prefix, config_path=args.config,
                      prompt_type=args.prompt_type, use_prompt=args.use_prompt, label_column=args.label_column,
                      folds=args.folds, overwrite=args.overwrite, save_format=args.save_format,
                      random_init=args.random_init, token_dictionary=args.token_dictionary, training=training,
                      num_threads=args.num_threads, baselines=args.baselines,
                      baseline_features=args.baseline_features,
                      allow_low_gene_overlap=args.allow_low_gene_overlap, task_weights=args.task_weights,
                      pooling=args.pooling)


def run(args: argparse.Namespace) -> int:
    from geneformer_peft.training.cross_validation import run_cross_validation

    summary = run_cross_validation(options_from_args(args))
    if not logging.getLogger("geneformer_peft").isEnabledFor(logging.INFO):  # else the log showed it
        print(f"Summary over folds {summary['fold_ids']} ({summary['run_dir']}):\n{summary['table']}")
    return 0
