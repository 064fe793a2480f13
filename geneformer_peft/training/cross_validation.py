"""K-fold PEFT fine-tuning: one fold after another, outputs written once, resumable.

Layout (every file is described in ``docs/outputs.md``)::

    <output_path>/<out_prefix><prompt types joined by _>/<dataset_name>/
        run.log  summary.json  summary.csv
        <i>/  predictions.csv  predictions.pickle  metrics.json  config.json  tokenizer.json
              pytorch_model.bin (or model.safetensors)  peft_model.safetensors
              confusion_matrix.png  training_curves.png  provenance.json  fold_done.json
        .resume/<i>/epoch_checkpoint.pt  provenance.json     (while a fold is unfinished)
        .lock                                                (while a job runs here)

A fold folder appears only complete (built under a temporary name, renamed at the end);
a finished fold is skipped on the next run unless ``overwrite`` is set, and only when its
recorded settings (``provenance.json``) equal the new run's; otherwise the run is refused.
Every selected fold's data is checked before the first fold trains (``preflight.py``), and
one job at a time holds the run folder (``run_lock.py``). See ``docs/run_safety.md``.
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
from geneformer_peft.errors import DataError, RunInterrupted, TrainingDiverged, interruption
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
from geneformer_peft.models.generation import check_checkpoint_data
from geneformer_peft.models.loading import load_classifier, resolve_config
from geneformer_peft.training import baseline_job, distributed
from geneformer_peft.training.arguments import TrainingArguments
from geneformer_peft.training.preflight import (
    FoldCheck,
    check_folds,
    fold_config,
    vocabulary_source,
)
from geneformer_peft.training.provenance import (
    PROVENANCE_FILE,
    SettingsChanged,
    compare_settings,
    differing_keys_message,
    read_provenance,
    summary_settings,
)
from geneformer_peft.training.run_lock import acquire_run_lock, release_run_lock
from geneformer_peft.training.run_safety import clean_stale_temps
from geneformer_peft.training.threads import apply_num_threads
from geneformer_peft.training.multitask import (
    MultiTaskLoss,
    TaskSet,
    task_class_weights,
    task_file,
    write_task_predictions,
)
from geneformer_peft.training.trainer import CHECKPOINT_NAME, FoldTrainer, set_seed
from transformerslocal import (
    BertConfig,
    BertForSequenceClassification,
    mark_trainable,
    save_peft_weights,
)
from transformerslocal.peft.quantize import check_quantizable, quantize_base, require_torchao

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
    label_column: str | list[str] = "cell_type"  # several columns: multi-task (training/multitask.py)
    folds: list[int] | None = None
    overwrite: bool = False
    save_format: str = "bin"
    random_init: bool = False
    token_dictionary: Path | None = None
    training: TrainingArguments = field(default_factory=TrainingArguments)
    config_overrides: dict = field(default_factory=dict)
    num_threads: int | None = None  # torch CPU threads; None: chosen from the free cores (training/threads.py)
    baselines: str = "logreg"  # linear baseline per fold: "logreg" or "none" (training/baseline_job.py)
    baseline_features: str = "tokens"  # "tokens" (rank-weighted bag of genes) or "expression"
    allow_low_gene_overlap: bool = False  # go on when few of the data's genes have pretrained rows (checks/)
    task_weights: str | list[float] | None = None  # multi-task loss: None (1 each), weights, or "uncertainty"
    pooling: str | None = None  # classifier pooling (Geneformer: first, mean, attention); None: the config's

    def __post_init__(self) -> None:
        from geneformer_peft.training.multitask import parse_task_weights, task_columns

        columns = task_columns(self.label_column)
        # one column is the single-task job exactly as before ("a" and ["a"] alike); several a list
        self.label_column = columns[0] if len(columns) == 1 else columns
        if self.task_weights is not None and len(columns) == 1:
            raise DataError(f"--task_weights {self.task_weights!r} weighs the tasks of a multi-task run; "
                            f"--label_column {self.label_column!r} names one task (name several, e.g. cell_type,disease)")
        self.task_weights = parse_task_weights(self.task_weights, len(columns))


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
                           use_prompt=opts.use_prompt, overrides=opts.config_overrides)  # --pooling: check_pooling
    prompt_type = probe.prompt_type if probe.peft_methods else ""
    check_pooling(opts, probe)
    # the run's config, resolved once here; each fold's adds its labels (preflight.fold_config)
    base_config = probe.copy(classifier_pooling=opts.pooling) if opts.pooling is not None else probe
    if args.quantize is not None:  # refused (or the missing extra named) before any fold starts
        check_quantizable(probe, args.quantize, source=str(opts.config_path or opts.model_path))
        try:
            require_torchao()
        except ImportError as err:
            raise DataError(str(err)) from err
    run_dir = run_directory(opts, prompt_type)
    folds = opts.folds if opts.folds is not None else discover_folds(opts.data_path, opts.dataset_name)
    check_fold_files(opts.data_path, opts.dataset_name,
                     [f for f in folds if opts.overwrite or not is_fold_done(run_dir / str(f))])
    baseline_job.check_baseline_data(opts, [f for f in folds if opts.overwrite or not is_fold_done(run_dir / str(f))])
    lock = acquire_run_lock(run_dir) if distributed.is_main_process() else None  # one job per run folder
    handler, root_level, fold = None, None, None
    try:
        if distributed.is_main_process():
            handler, root_level = attach_log_file(run_dir / "run.log")
            clean_stale_temps(run_dir)
        threads = apply_num_threads(opts.num_threads)
        settings = {"run_dir": str(run_dir), "dataset_name": opts.dataset_name, "data_path": str(opts.data_path),
                    "model_path": str(opts.model_path), "config_path": str(opts.config_path or ""),
                    "prompt_type": prompt_type, "folds": folds, "label_column": opts.label_column,
                    "device": str(device), "random_init": opts.random_init, "training": args.to_dict(),
                    "torch_threads": threads.num_threads, "versions": library_versions()}
        logger.info("run settings: %s", json.dumps(settings, indent=1, default=str))
        if vocabulary_source(opts) is None:
            logger.warning("no gene vocabulary: %s has no tokenizer.json and --token_dictionary was not given, "
                           "so the fold folders will not say which gene each token id is", opts.model_path)
        checks = check_folds(opts, folds, base_config=base_config, hash_cache=run_dir / ".cache" / "file_hashes.json",
                             environment={"versions": settings["versions"], "device": str(device)})
        refuse_changed_settings(opts, run_dir, checks)
        report_compatibility(run_dir, checks)
        provenance = {c.fold: c.provenance for c in checks}
        fold_metrics, fold_ids, fold_baselines = [], [], []
        for fold in folds:
            fold_dir = run_dir / str(fold)
            if fold_dir.exists() and opts.overwrite and distributed.is_main_process():
                # the old fold stays until the new one is complete (write_fold_outputs swaps them)
                shutil.rmtree(run_dir / RESUME_DIR / str(fold), ignore_errors=True)
            distributed.barrier()
            if is_fold_done(fold_dir) and not opts.overwrite:
                logger.info("fold %d: finished earlier, skipped (%s); pass --overwrite to redo it", fold, fold_dir)
                metrics = json.loads((fold_dir / "metrics.json").read_text(encoding="utf-8"))
            elif fold_dir.exists() and not opts.overwrite:
                raise FileExistsError(f"{fold_dir} exists but is not a finished fold (no valid fold_done.json); "
                                      "remove it or pass --overwrite")
            else:
                record_resume_provenance(run_dir, fold, provenance[fold])
                metrics = train_fold(opts, fold, fold_dir, device, base_config)
            fold_metrics.append(metrics)
            fold_ids.append(fold)
            fold_baselines.append(baseline_job.read_fold_baseline(fold_dir) if opts.baselines != "none" else None)
        fold = None
        summary = summarize_folds(fold_metrics, fold_ids)
        summary.update(recorded_settings(run_dir, fold_ids, settings, checks))
        comparison_table = baseline_job.add_baseline_summary(summary, fold_metrics, fold_baselines, fold_ids,
                                                             prompt_type)
        if not isinstance(opts.label_column, str):  # multi-task: the headline is the mean of tasks, then each task
            task_tables = baseline_job.add_task_summaries(summary, fold_metrics, fold_baselines, fold_ids,
                                                          prompt_type, opts.label_column)
            comparison_table = "\n\n".join(t for t in (comparison_table, task_tables) if t)
        if distributed.is_main_process():
            write_summary(run_dir, summary)
        table = format_summary_table(summary) + (f"\n\n{comparison_table}" if comparison_table else "")
        logger.info("summary over %d folds (%s):\n%s", len(fold_ids), run_dir, table)
        summary["table"] = table
        summary["run_dir"] = str(run_dir)
        return summary
    except KeyboardInterrupt as error:
        if not isinstance(error, RunInterrupted):
            where = f"during fold {fold}" if fold is not None else "before training"
            error = interruption(error, f"interrupted {where}; rerun the same command to resume")
        _log_to_file(handler, error)
        raise error from None
    except BaseException as error:
        _log_to_file(handler, error)
        raise
    finally:
        if handler is not None:
            detach_log_file(handler, root_level)
        if lock is not None:
            release_run_lock(lock)


def check_pooling(opts: RunOptions, config) -> None:
    """``--pooling`` is the Geneformer (BERT) pooler's; the other families' heads pool their own way.

    Raises
    ------
    DataError
        For ``--pooling`` with a scBERT or CellFM checkpoint, or an unknown value.
    """
    if opts.pooling is None:
        return
    from transformerslocal.configuration_bert import CLASSIFIER_POOLINGS

    if not isinstance(config, BertConfig):
        raise DataError(f"--pooling {opts.pooling!r}: the checkpoint {opts.model_path} is of model_type "
                        f"{getattr(config, 'model_type', '?')!r}, whose classifier head pools in its own way; "
                        "--pooling applies to Geneformer (BERT) checkpoints only (leave it out)")
    if opts.pooling not in CLASSIFIER_POOLINGS:
        raise DataError(f"--pooling {opts.pooling!r}: expected one of {list(CLASSIFIER_POOLINGS)}")


def _log_to_file(handler: logging.Handler | None, error: BaseException) -> None:
    """Write the error that ends the run as the last line of run.log (the console shows it
    through the CLI, so it goes to the file only)."""
    if handler is None:
        return
    known = isinstance(error, (DataError, KeyboardInterrupt, TrainingDiverged, OSError, ValueError))
    text = str(error) if known and str(error) else f"{type(error).__name__}: {error}"
    handler.handle(logging.LogRecord(logger.name, logging.ERROR, __file__, 0, "run stopped: %s", (text,), None))


def report_compatibility(run_dir: Path, checks: list[FoldCheck]) -> None:
    """Log the folds' compatibility warnings (once per distinct message) and write every fold's
    report to ``<run_dir>/compatibility.json``."""
    from geneformer_peft.checks import REPORT_FILE

    reports = {c.fold: c.compatibility for c in checks if c.compatibility is not None}
    if not reports or not distributed.is_main_process():
        return
    seen: dict[str, list[int]] = {}
    for fold, report in reports.items():
        for finding in report.warnings:
            seen.setdefault(f"{finding.check}: {finding.message}", []).append(fold)
    for message, folds in seen.items():
        logger.warning("fold%s %s: %s", "s" if len(folds) > 1 else "", ", ".join(map(str, folds)), message)
    logger.info("compatibility of model and data checked for folds %s (%s)", sorted(reports), run_dir / REPORT_FILE)
    write_json(run_dir / REPORT_FILE, {str(fold): report.to_dict() for fold, report in reports.items()})


def refuse_changed_settings(opts: RunOptions, run_dir: Path, checks: list[FoldCheck]) -> None:
    """Compare each selected fold's recorded settings (finished folds, and interrupted ones
    with a resume checkpoint) with this run's; refuse any difference unless ``--overwrite``.

    Raises
    ------
    SettingsChanged
        Naming each fold, every differing key with both values, and the two ways forward.
    """
    refusals = []
    for check in checks:
        fold_dir, resume_dir = run_dir / str(check.fold), run_dir / RESUME_DIR / str(check.fold)
        if is_fold_done(fold_dir):
            where, folder = f"fold {check.fold} (finished, {fold_dir})", fold_dir
            if opts.overwrite:
                continue
        elif (resume_dir / CHECKPOINT_NAME).is_file():
            where, folder = f"fold {check.fold} (interrupted, resume checkpoint in {resume_dir})", resume_dir
        else:
            continue
        recorded = read_provenance(folder)
        if recorded is None:
            logger.warning("%s has no %s (written by an older version): its settings cannot be checked against "
                           "this run's", where, PROVENANCE_FILE)
            continue
        diffs = compare_settings(recorded["settings"], check.provenance["settings"])
        if not diffs:
            continue
        if opts.overwrite:  # an interrupted fold with other settings: start it afresh
            logger.warning("%s was started with other settings; --overwrite: training it from the start", where)
            if distributed.is_main_process():
                shutil.rmtree(resume_dir, ignore_errors=True)
            continue
        refusals.append(f"  {where}:\n{differing_keys_message(diffs)}")
    if refusals:
        raise SettingsChanged(
            f"{run_dir} holds results made with other settings than this command's; refusing to mix them "
            f"({len(refusals)} fold{'s' if len(refusals) != 1 else ''}):\n" + "\n".join(refusals) +
            "\nEither pass --overwrite to redo these folds with the new settings, or write the new run elsewhere "
            "with another --output_path or --out_prefix (the existing results stay as they are).")


def record_resume_provenance(run_dir: Path, fold: int, record: dict | None) -> None:
    """Write the fold's provenance beside its resume checkpoint before it trains (a resume
    compares against it; :func:`write_fold_outputs` moves it into the fold folder)."""
    if record is None or not distributed.is_main_process():
        return
    resume_dir = run_dir / RESUME_DIR / str(fold)
    if not (resume_dir / CHECKPOINT_NAME).is_file() or read_provenance(resume_dir) is None:
        write_json(resume_dir / PROVENANCE_FILE, record)


def recorded_settings(run_dir: Path, fold_ids: list[int], settings: dict, checks: list[FoldCheck]) -> dict:
    """The summary's settings, read from each fold's own ``provenance.json`` (so a table
    always carries the settings that produced its numbers), this invocation's facts under
    ``run``, and the folds whose val/test labels are absent from train."""
    records = {fold: read_provenance(run_dir / str(fold)) for fold in fold_ids}
    out = summary_settings(records)
    if out["settings_differ_between_folds"]:
        logger.warning("the folds of this summary were made with different settings: %s",
                       json.dumps(out["settings_differ_between_folds"], default=str))
    if out["folds_without_provenance"]:
        logger.warning("folds %s have no %s (older version); the summary's settings cover the other folds only",
                       out["folds_without_provenance"], PROVENANCE_FILE)
    out["run"] = {k: v for k, v in settings.items() if k != "training"}
    out["labels_absent_from_train"] = {str(c.fold): c.absent_from_train for c in checks if c.absent_from_train}
    return out


def train_fold(opts: RunOptions, fold: int, fold_dir: Path, device: torch.device, base_config) -> dict[str, Any]:
    """Train, select, test and write one fold (``base_config``: the run's resolved checkpoint
    config, without labels); return its metrics."""
    args = opts.training
    set_seed(args.seed + fold)
    train_ds, val_ds, test_ds = load_fold(opts.data_path, opts.dataset_name, fold)
    tasks = None
    if isinstance(opts.label_column, str):
        label2id, _ = label_mapping(train_ds, val_ds, test_ds, opts.label_column)
        label2id = {str(k): v for k, v in label2id.items()}
        # finetune_max_length is recorded in the fold's config.json, so that prediction keeps the same genes per cell
        config = fold_config(base_config, opts, label2id)
    else:  # multi-task: one block of the classifier's rows per task (training/multitask.py)
        tasks = TaskSet.from_datasets({"train": train_ds, "val": val_ds, "test": test_ds}, opts.label_column)
        config = fold_config(base_config, opts, tasks.label2id, tasks=tasks)
    if opts.random_init:  # ablation: the same architecture without the pretrained weights
        from geneformer_peft.models.families import family_of_config
        model = family_of_config(config).classifier_class(config)  # the checkpoint's model family
        logger.info("fold %d: --random_init: weights randomly initialised, %s not loaded", fold, opts.model_path)
    else:
        model = load_classifier(opts.model_path, config)
    report = mark_trainable(model)
    logger.info("fold %d: %s", fold, report)
    if args.quantize is not None:  # the frozen projections, as QLoRA: after loading, before training
        quantize_base(model, args.quantize, device=device)
    if args.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    model.to(device)

    max_length = args.max_length or config.max_position_embeddings
    if max_length > config.max_position_embeddings:
        raise ValueError(f"--max_length {max_length} exceeds the model's max_position_embeddings "
                         f"{config.max_position_embeddings}")
    from geneformer_peft.models.families import family_of_config

    family = family_of_config(config)
    splits = {}
    for name, ds in (("train", train_ds), ("val", val_ds), ("test", test_ds)):
        if tasks is not None:
            splits[name] = EncodedCells.from_dataset(ds, max_length=family.data_length(max_length),
                                                     name=f"fold {fold} {name}", values_column=family.values_column)
            splits[name].labels = tasks.encode(ds, name=f"fold {fold} {name}")
            continue
        mapping = {v: label2id[str(v)] for v in ds.unique(opts.label_column)}
        splits[name] = EncodedCells.from_dataset(ds, label_column=opts.label_column, label2id=mapping,
                                                 max_length=family.data_length(max_length), name=f"fold {fold} {name}",
                                                 values_column=family.values_column)
    for split in splits.values():
        check_vocabulary(split, config.vocab_size, opts)
        check_checkpoint_data(split, config, opts.model_path, opts.token_dictionary)  # V1/V2 mismatch
    weights, objective = None, None
    if tasks is not None and opts.task_weights == "uncertainty" and distributed.is_distributed():
        raise DataError("--task_weights uncertainty learns the task weights in one process; under torchrun each "
                        "rank would learn its own: give fixed weights (e.g. --task_weights 1,1) or run without torchrun")
    if tasks is not None:
        weights = task_class_weights(tasks, splits["train"].labels, args.class_weighting)
        objective = MultiTaskLoss(tasks, weights=opts.task_weights, class_weights=weights)
    elif args.class_weighting == "reference":
        weights = reference_class_weights(splits["train"].labels, config.num_labels, id2label=config.id2label)

    from geneformer_peft.training.frozen_cache import FrozenPrefixCache
    cache = FrozenPrefixCache.for_model(model) if args.cache_frozen_layers else None
    resume_dir = Path(fold_dir).parent / RESUME_DIR / str(fold)
    trainer = FoldTrainer(model, splits["train"], splits["val"], args, class_weights=None if tasks else weights,
                          device=device, checkpoint_dir=resume_dir, encoder_cache=cache, desc=f"fold {fold}",
                          objective=objective)
    try:
        fit = trainer.fit()
    except TrainingDiverged:
        logger.error("fold %d stopped: training diverged; finished folds keep their outputs", fold)
        raise
    except KeyboardInterrupt as error:
        raise interruption(error, f"interrupted during fold {fold} epoch {trainer.epoch}; rerun the same command "
                                  "to resume (from the last finished epoch)") from None

    t0 = time.perf_counter()
    logits = predict_logits(model, splits["test"], batch_size=args.eval_batch_size or args.batch_size,
                            device=device, precision=args.precision, progress=args.progress, desc=f"fold {fold} test",
                            encoder_cache=cache)
    test_seconds = time.perf_counter() - t0
    truth = splits["test"].labels
    if tasks is not None:
        metrics = tasks.metrics(truth, logits)
    else:
        probs = softmax(logits)
        preds = probs.argmax(axis=1)
        names = [config.id2label[i] for i in range(config.num_labels)]
        metrics = classification_metrics(truth, preds, label_names=names, probabilities=probs)
    metrics.update(report.to_dict())
    metrics.update({
        "prompt_type": config.prompt_type if config.peft_methods else "",
        "train_seconds": fit.train_seconds, "train_cells_per_second": fit.cells_per_second,
        "test_cells_per_second": len(truth) / max(test_seconds, 1e-9), "epochs_run": fit.epochs_run,
        "best_epoch": fit.best_epoch, "best_val_macro_f1": fit.best_val_macro_f1, "stopped_early": fit.stopped_early,
    })
    datasets = {"train": train_ds, "val": val_ds, "test": test_ds}
    if tasks is not None:
        metrics["task_weights"] = dict(zip(tasks.names, objective.task_weights()))
        baseline = baseline_job.compute_multitask_baseline(opts, fold, splits, datasets, config, tasks, weights,
                                                           fit.train_seconds)
    else:
        baseline = baseline_job.compute_fold_baseline(opts, fold, splits, datasets, config, weights,
                                                      fit.train_seconds)
    if distributed.is_main_process():
        write_fold_outputs(opts, fold, fold_dir, model, config, splits["test"], logits, metrics, fit.history,
                           baseline=baseline, tasks=tasks)
    distributed.barrier()
    logger.info("fold %d: test accuracy %.4f, macro-F1 %.4f, micro-F1 %.4f -> %s", fold, metrics["accuracy"],
                metrics["macro_f1"], metrics["micro_f1"], fold_dir)
    return metrics


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
                       logits: np.ndarray, metrics: dict, history: list, baseline=None, tasks=None) -> None:
    """Every file of a finished fold, built under a temporary name and renamed at the end
    (with ``baseline``, a :class:`~geneformer_peft.evaluation.baseline.BaselineResult`, its files too;
    a multi-task fold's (``tasks``) predictions, confusion matrices and baselines per task)."""
    probs = softmax(logits)
    preds = probs.argmax(axis=1)
    names = [config.id2label[i] for i in range(config.num_labels)]
    with atomic_directory(fold_dir, overwrite=opts.overwrite) as tmp:
        if tasks is not None:
            write_task_predictions(tmp, tasks, test, logits, metrics, history)
        else:
            write_predictions_csv(tmp / "predictions.csv", cell_index=test.index, label_names=names,
                                  pred_ids=preds, probabilities=probs, true_ids=test.labels, cell_ids=test.cell_ids)
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
        title = f"{opts.dataset_name} fold {fold} ({metrics['prompt_type'] or 'full'})"
        if tasks is not None:
            for task in tasks:
                if task.name in metrics["tasks"]:
                    plot_confusion_matrix(np.asarray(metrics["tasks"][task.name]["confusion_matrix"]),
                                          list(task.labels), tmp / task_file("confusion_matrix", task.name, ".png"),
                                          title=f"{title}: {task.name}")
        else:
            plot_confusion_matrix(np.asarray(metrics["confusion_matrix"]), names, tmp / "confusion_matrix.png",
                                  title=title)
        plot_training_curves(history, tmp / "training_curves.png", best_epoch=metrics.get("best_epoch"))
        if baseline is not None and tasks is not None:
            baseline_job.write_multitask_baseline(tmp, baseline, tasks, test, metrics,
                                                  title=f"{opts.dataset_name} fold {fold}: per-class F1")
        elif baseline is not None:
            baseline_job.write_fold_baseline(tmp, baseline, test, names, metrics,
                                             title=f"{opts.dataset_name} fold {fold}: per-class F1")
        if (Path(fold_dir).parent / RESUME_DIR / str(fold) / PROVENANCE_FILE).is_file():
            shutil.copy2(Path(fold_dir).parent / RESUME_DIR / str(fold) / PROVENANCE_FILE, tmp / PROVENANCE_FILE)
        mark_fold_done(tmp, info={"fold": fold, "macro_f1": metrics["macro_f1"], "accuracy": metrics["accuracy"]})
    shutil.rmtree(Path(fold_dir).parent / RESUME_DIR / str(fold), ignore_errors=True)
