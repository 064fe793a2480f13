"""K-fold PEFT fine-tuning: one fold after another, outputs written once, resumable.

Layout (every file is described in ``docs/outputs.md``)::

    <output_path>/<out_prefix><prompt types joined by _>/<dataset_name>/
        run.log  summary.json  summary.csv
        <i>/  predictions.csv  predictions.pickle  metrics.json  config.json  tokenizer.json
              pytorch_model.bin (or model.safetensors)  peft_model.safetensors
              confusion_matrix.png  training_curves.png  fold_done.json
        .resume/<i>/epoch_checkpoint.pt     (while a fold is unfinished)

A fold folder appears only complete (built under a temporary name, renamed at the end);
a finished fold is skipped on the next run unless ``overwrite`` is set.
"""
from __future__ import annotations

import json
import logging
import platform
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from geneformer_peft.data.cells import EncodedCells
from geneformer_peft.data.folds import (
    check_fold_files,
    discover_folds,
    label_mapping,
    load_fold,
)
from geneformer_peft.data.samplers import class_weights as reference_class_weights
from geneformer_peft.data.vocab import load_token_dictionary, save_tokenizer_json
from geneformer_peft.errors import DataError, TrainingDiverged
from geneformer_peft.evaluation.inference import predict_logits, softmax
from geneformer_peft.evaluation.metrics import classification_metrics
from geneformer_peft.evaluation.outputs import (
    atomic_directory,
    format_summary_table,
    is_fold_done,
    mark_fold_done,
    summarize_folds,
    write_json,
    write_pickle,
    write_predictions_csv,
    write_summary,
)
from geneformer_peft.evaluation.plots import plot_confusion_matrix, plot_training_curves
from geneformer_peft.log_format import attach_log_file, detach_log_file
from geneformer_peft.models.device import resolve_device
from geneformer_peft.models.loading import load_classifier, resolve_config
from geneformer_peft.training import distributed
from geneformer_peft.training.arguments import TrainingArguments
from geneformer_peft.training.trainer import FoldTrainer, set_seed
from transformerslocal import (
    BertForSequenceClassification,
    mark_trainable,
    save_peft_weights,
)

logger = logging.getLogger(__name__)

__all__ = ["RunOptions", "library_versions", "run_cross_validation", "run_directory", "train_fold"]

RESUME_DIR = ".resume"


@dataclass
class RunOptions:
    """What to run: data, checkpoint, method and where outputs go."""

    dataset_name: str
    data_path: Path
    output_path: Path
    model_path: Path
    out_prefix: str = ""
    config_path: Path | None = None
    prompt_type: str | None = None
    use_prompt: bool | None = None
    label_column: str = "cell_type"
    folds: list[int] | None = None
    overwrite: bool = False
    save_format: str = "bin"
    random_init: bool = False
    token_dictionary: Path | None = None
    training: TrainingArguments = field(default_factory=TrainingArguments)
    config_overrides: dict = field(default_factory=dict)


def run_directory(opts: RunOptions, prompt_type: str) -> Path:
    method = "_".join(p for p in prompt_type.split(",") if p) or "full_finetune"
    return Path(opts.output_path) / f"{opts.out_prefix}{method}" / opts.dataset_name


def library_versions() -> dict[str, str]:
    import importlib.metadata as md

    out = {"python": platform.python_version(), "platform": platform.platform()}
    for name in ("torch", "loralib", "datasets", "numpy", "scikit-learn", "geneformer-peft"):
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            out[name] = "not installed"
    return out


def run_cross_validation(opts: RunOptions) -> dict[str, Any]:
    """Train and test every fold; return the cross-fold summary (also written to disk)."""
    args = opts.training
    device = distributed.local_device(resolve_device(args.device))
    distributed.init_distributed(device)
    probe = resolve_config(opts.model_path, config_path=opts.config_path, prompt_type=opts.prompt_type,
                           use_prompt=opts.use_prompt, overrides=opts.config_overrides)
    prompt_type = probe.prompt_type if probe.peft_methods else ""
    run_dir = run_directory(opts, prompt_type)
    folds = opts.folds if opts.folds is not None else discover_folds(opts.data_path, opts.dataset_name)
    check_fold_files(opts.data_path, opts.dataset_name,
                     [f for f in folds if opts.overwrite or not is_fold_done(run_dir / str(f))])
    handler, root_level = attach_log_file(run_dir / "run.log") if distributed.is_main_process() else (None, None)
    try:
        settings = {"run_dir": str(run_dir), "dataset_name": opts.dataset_name, "data_path": str(opts.data_path),
                    "model_path": str(opts.model_path), "config_path": str(opts.config_path or ""),
                    "prompt_type": prompt_type, "folds": folds, "label_column": opts.label_column,
                    "device": str(device), "random_init": opts.random_init, "training": args.to_dict(),
                    "versions": library_versions()}
        logger.info("run settings: %s", json.dumps(settings, indent=1, default=str))
        if vocabulary_source(opts) is None:
            logger.warning("no gene vocabulary: %s has no tokenizer.json and --token_dictionary was not given, "
                           "so the fold folders will not say which gene each token id is", opts.model_path)
        fold_metrics, fold_ids = [], []
        for fold in folds:
            fold_dir = run_dir / str(fold)
            if fold_dir.exists() and opts.overwrite and distributed.is_main_process():
                shutil.rmtree(fold_dir)
                shutil.rmtree(run_dir / RESUME_DIR / str(fold), ignore_errors=True)
            distributed.barrier()
            if is_fold_done(fold_dir):
                logger.info("fold %d: finished earlier, skipped (%s); pass --overwrite to redo it", fold, fold_dir)
                metrics = json.loads((fold_dir / "metrics.json").read_text(encoding="utf-8"))
            elif fold_dir.exists():
                raise FileExistsError(f"{fold_dir} exists but is not a finished fold (no valid fold_done.json); "
                                      "remove it or pass --overwrite")
            else:
                metrics = train_fold(opts, fold, fold_dir, device)
            fold_metrics.append(metrics)
            fold_ids.append(fold)
        summary = summarize_folds(fold_metrics, fold_ids)
        summary["settings"] = settings
        if distributed.is_main_process():
            write_summary(run_dir, summary)
        table = format_summary_table(summary)
        logger.info("summary over %d folds (%s):\n%s", len(fold_ids), run_dir, table)
        summary["table"] = table
        summary["run_dir"] = str(run_dir)
        return summary
    finally:
        if handler is not None:
            detach_log_file(handler, root_level)


def train_fold(opts: RunOptions, fold: int, fold_dir: Path, device: torch.device) -> dict[str, Any]:
    """Train, select, test and write one fold; return its metrics."""
    args = opts.training
    set_seed(args.seed + fold)
    train_ds, val_ds, test_ds = load_fold(opts.data_path, opts.dataset_name, fold)
    label2id, _ = label_mapping(train_ds, val_ds, test_ds, opts.label_column)
    label2id = {str(k): v for k, v in label2id.items()}
    config = resolve_config(opts.model_path, config_path=opts.config_path, prompt_type=opts.prompt_type,
                            use_prompt=opts.use_prompt, label2id=label2id, overrides=opts.config_overrides)
    # recorded in the fold's config.json, so that prediction keeps the same genes per cell
    config = config.copy(finetune_max_length=args.max_length or config.max_position_embeddings)
    if opts.random_init:  # ablation: the same architecture without the pretrained weights
        model = BertForSequenceClassification(config)
        logger.info("fold %d: --random_init: weights randomly initialised, %s not loaded", fold, opts.model_path)
    else:
        model = load_classifier(opts.model_path, config)
    report = mark_trainable(model)
    logger.info("fold %d: %s", fold, report)
    if args.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    model.to(device)

    max_length = args.max_length or config.max_position_embeddings
    if max_length > config.max_position_embeddings:
        raise ValueError(f"--max_length {max_length} exceeds the model's max_position_embeddings "
                         f"{config.max_position_embeddings}")
    splits = {}
    for name, ds in (("train", train_ds), ("val", val_ds), ("test", test_ds)):
        mapping = {v: label2id[str(v)] for v in ds.unique(opts.label_column)}
        splits[name] = EncodedCells.from_dataset(ds, label_column=opts.label_column, label2id=mapping,
                                                 max_length=max_length, name=f"fold {fold} {name}")
    for split in splits.values():
        check_vocabulary(split, config.vocab_size, opts)
    weights = None
    if args.class_weighting == "reference":
        weights = reference_class_weights(splits["train"].labels, config.num_labels, id2label=config.id2label)

    from geneformer_peft.training.frozen_cache import FrozenPrefixCache
    cache = FrozenPrefixCache.for_model(model) if args.cache_frozen_layers else None
    resume_dir = Path(fold_dir).parent / RESUME_DIR / str(fold)
    trainer = FoldTrainer(model, splits["train"], splits["val"], args, class_weights=weights, device=device,
                          checkpoint_dir=resume_dir, encoder_cache=cache, desc=f"fold {fold}")
    try:
        fit = trainer.fit()
    except TrainingDiverged:
        logger.error("fold %d stopped: training diverged; finished folds keep their outputs", fold)
        raise

    t0 = time.perf_counter()
    logits = predict_logits(model, splits["test"], batch_size=args.eval_batch_size or args.batch_size,
                            device=device, precision=args.precision, progress=args.progress, desc=f"fold {fold} test",
                            encoder_cache=cache)
    test_seconds = time.perf_counter() - t0
    probs = softmax(logits)
    preds = probs.argmax(axis=1)
    names = [config.id2label[i] for i in range(config.num_labels)]
    truth = splits["test"].labels
    metrics = classification_metrics(truth, preds, label_names=names, probabilities=probs)
    metrics.update(report.to_dict())
    metrics.update({
        "prompt_type": config.prompt_type if config.peft_methods else "",
        "train_seconds": fit.train_seconds, "train_cells_per_second": fit.cells_per_second,
        "test_cells_per_second": len(truth) / max(test_seconds, 1e-9), "epochs_run": fit.epochs_run,
        "best_epoch": fit.best_epoch, "best_val_macro_f1": fit.best_val_macro_f1, "stopped_early": fit.stopped_early,
    })
    if distributed.is_main_process():
        write_fold_outputs(opts, fold, fold_dir, model, config, splits["test"], logits, metrics, fit.history)
    distributed.barrier()
    logger.info("fold %d: test accuracy %.4f, macro-F1 %.4f, micro-F1 %.4f -> %s", fold, metrics["accuracy"],
                metrics["macro_f1"], metrics["micro_f1"], fold_dir)
    return metrics


def vocabulary_source(opts: RunOptions) -> Path | None:
    """The gene vocabulary of the run: ``--token_dictionary``, else the checkpoint's tokenizer.json."""
    if opts.token_dictionary is not None:
        return Path(opts.token_dictionary)
    candidate = Path(opts.model_path) / "tokenizer.json"
    return candidate if candidate.is_file() else None


def check_vocabulary(cells: EncodedCells, vocab_size: int, opts: RunOptions) -> None:
    """Every cell needs a gene, and token ids must index the model's embedding rows: data
    tokenized with another dictionary than the checkpoint's fails here, not deep inside
    the embedding (or as a NaN from a fully masked attention row)."""
    empty = np.flatnonzero(cells.lengths == 0)
    if len(empty):
        raise DataError(f"{cells.name} of dataset {opts.dataset_name!r}: {len(empty)} cells have no gene token "
                        f"(empty input_ids, e.g. rows {empty[:5].tolist()}); none of their genes was in the "
                        "vocabulary. Filter them out before splitting (the tokenizer warns about them)")
    top = int(cells.flat.max()) if len(cells.flat) else -1
    if top >= vocab_size:
        raise DataError(f"{cells.name} of dataset {opts.dataset_name!r} holds token id {top}, but the model at "
                        f"{opts.model_path} has vocab_size {vocab_size}; tokenize with the checkpoint's own "
                        "token dictionary (or remap the checkpoint to yours: geneformer_peft.data.vocab."
                        "remap_checkpoint_vocabulary)")


def write_fold_outputs(opts: RunOptions, fold: int, fold_dir: Path, model, config, test: EncodedCells,
                       logits: np.ndarray, metrics: dict, history: list) -> None:
    """Every file of a finished fold, built under a temporary name and renamed at the end."""
    probs = softmax(logits)
    preds = probs.argmax(axis=1)
    names = [config.id2label[i] for i in range(config.num_labels)]
    with atomic_directory(fold_dir) as tmp:
        write_predictions_csv(tmp / "predictions.csv", cell_index=test.index, label_names=names,
                              pred_ids=preds, probabilities=probs, true_ids=test.labels)
        write_pickle(tmp / "predictions.pickle", {
            "label_names": names, "labels": test.labels, "predictions": preds, "logits": logits,
            "probabilities": probs, "metrics": metrics, "history": history})
        model.to("cpu")
        save_peft_weights(model, tmp)
        model.save_pretrained(tmp, safe_serialization=(opts.save_format == "safetensors"))
        vocabulary = vocabulary_source(opts)
        if vocabulary is not None:
            save_tokenizer_json(load_token_dictionary(vocabulary), tmp)
        write_json(tmp / "metrics.json", metrics)
        write_json(tmp / "history.json", history)
        plot_confusion_matrix(np.asarray(metrics["confusion_matrix"]), names, tmp / "confusion_matrix.png",
                              title=f"{opts.dataset_name} fold {fold} ({metrics['prompt_type'] or 'full'})")
        plot_training_curves(history, tmp / "training_curves.png")
        mark_fold_done(tmp, info={"fold": fold, "macro_f1": metrics["macro_f1"], "accuracy": metrics["accuracy"]})
    shutil.rmtree(Path(fold_dir).parent / RESUME_DIR / str(fold), ignore_errors=True)
