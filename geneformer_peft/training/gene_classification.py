"""Gene classification (Geneformer's gene classifier): every gene token of a cell is labelled
with its gene's class, other tokens are ignored (label -100), and a token-classification head
(``BertForTokenClassification``, any PEFT method or full fine-tuning) learns it.

Genes, not cells, are split into folds (stratified by class): in fold ``k`` the genes of fold
``k`` are the test genes, a fifth of the remaining genes of each class (at least one where a
class has two or more left) are validation genes for choosing the epoch, the rest are
training genes. Every cell is used in every set, but a token is labelled only in the set its
gene belongs to, so a held-out gene is never labelled in training.

A gene's prediction is the mean class probability over all its occurrences in the cells;
metrics are over genes: ROC AUC (two classes) or macro-F1 (more), accuracy, confusion matrix.

Layout (``docs/recipes.md``)::

    <output_path>/<prompt types joined by _ or full_finetune>/
        run.log  folds.json  summary.json  summary.csv
        <k>/  gene_predictions.csv  metrics.json  history.json  confusion_matrix.png  roc.png  fold_done.json
"""
from __future__ import annotations

import json
import logging
import math
import shutil
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from geneformer_peft.checks import check_compatibility
from geneformer_peft.data.cells import EncodedCells
from geneformer_peft.data.dataset_io import load_saved_dataset
from geneformer_peft.data.vocab import is_special_token, load_token_dictionary
from geneformer_peft.errors import DataError, TrainingDiverged
from geneformer_peft.evaluation.metrics import classification_metrics
from geneformer_peft.evaluation.outputs import (
    atomic_directory,
    format_summary_table,
    is_fold_done,
    mark_fold_done,
    summarize_folds,
    write_json,
    write_summary,
)
from geneformer_peft.evaluation.plots import plot_confusion_matrix, plotting_available
from geneformer_peft.log_format import attach_log_file, detach_log_file
from geneformer_peft.models.device import autocast, resolve_device
from geneformer_peft.models.generation import check_checkpoint_data
from geneformer_peft.models.loading import resolve_config
from geneformer_peft.training.arguments import TrainingArguments
from geneformer_peft.training.provenance import (
    PROVENANCE_FILE,
    FileHashCache,
    SettingsChanged,
    compare_settings,
    differing_keys_message,
    option_settings,
    read_provenance,
)
from geneformer_peft.training.run_lock import acquire_run_lock, release_run_lock
from geneformer_peft.training.run_safety import clean_stale_temps, command_provenance
from geneformer_peft.training.schedules import make_optimizer, make_scheduler
from geneformer_peft.training.trainer import set_seed

logger = logging.getLogger(__name__)

__all__ = ["GeneClassOptions", "GeneFold", "gene_level_predictions", "load_gene_classes", "run_gene_classification",
           "split_genes", "token_labels"]

IGNORE_INDEX = -100


# ----------------------------------------------------------------------------- inputs
def load_gene_classes(path: str | Path, token_dictionary: Mapping[str, int], *, n_folds: int,
                      vocabulary_source: str = "the vocabulary") -> dict[str, list[str]]:
    """Read ``{class: [gene ids]}`` and check it against the vocabulary and the folds.

    Raises
    ------
    DataError
        Naming the file and: gene ids not in the vocabulary (each listed), a gene in two classes
        (both named), a class with fewer genes than folds, fewer than two classes, a malformed file.
    FileNotFoundError
        If ``path`` does not exist.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"--gene_classes {path} does not exist; expected a JSON file "
                                '{"class": ["ENSG...", ...], ...}')
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise DataError(f"{path}: not valid JSON ({err}); expected {{class: [gene ids]}}") from err
    if not isinstance(raw, Mapping) or len(raw) < 2:
        raise DataError(f"{path}: holds {json.dumps(raw)[:100]}; expected an object of at least two classes "
                        "{class: [gene ids]}")
    classes: dict[str, list[str]] = {}
    owner: dict[str, str] = {}
    for name, genes in raw.items():
        if not isinstance(genes, list) or not all(isinstance(g, str) for g in genes):
            raise DataError(f"{path}: class {name!r} holds {json.dumps(genes)[:100]}; expected a list of gene ids")
        unique = list(dict.fromkeys(genes))
        unknown = [g for g in unique if g not in token_dictionary or is_special_token(g)]
        if unknown:
            raise DataError(f"{path}: class {name!r}: {len(unknown)} gene ids are not in {vocabulary_source}: "
                            f"{unknown[:10]}{' ...' if len(unknown) > 10 else ''}; expected genes of the model's "
                            "token dictionary (Ensembl ids)")
        for gene in unique:
            if gene in owner:
                raise DataError(f"{path}: gene {gene} is in class {owner[gene]!r} and in class {name!r}; "
                                "expected each gene in one class")
            owner[gene] = str(name)
        if len(unique) < n_folds:
            raise DataError(f"{path}: class {name!r} has {len(unique)} genes, fewer than --n_folds {n_folds}; "
                            "expected at least one gene per class in every fold (lower --n_folds or add genes)")
        classes[str(name)] = unique
    return classes


@dataclass(frozen=True)
class GeneFold:
    """Gene ids of one fold's train, validation and test sets."""

    fold: int
    train: tuple[str, ...]
    val: tuple[str, ...]
    test: tuple[str, ...]

    def to_dict(self) -> dict:
        return {"fold": self.fold, "train": list(self.train), "val": list(self.val), "test": list(self.test)}


def split_genes(classes: Mapping[str, Sequence[str]], n_folds: int, *, seed: int = 0,
                val_fraction: float = 0.2) -> list[GeneFold]:
    """Stratified gene folds: each class's genes shuffled and dealt round-robin into folds.

    Parameters
    ----------
    classes
        ``{class: [gene ids]}``, disjoint, each with at least ``n_folds`` genes.
    n_folds
        Number of folds (>= 2).
    seed
        Shuffling seed.
    val_fraction
        Fraction of each class's non-test genes held out for validation (rounded, at least 1
        when the class has 2 or more non-test genes, never all of them).

    Returns
    -------
    list of GeneFold
        Test sets partition the genes; within a fold train, val and test are disjoint.
    """
    if n_folds < 2:
        raise ValueError(f"n_folds={n_folds}: expected an integer >= 2")
    rng = np.random.default_rng(seed)
    assignment: dict[str, list[list[str]]] = {}
    for name, genes in classes.items():
        order = [genes[i] for i in rng.permutation(len(genes))]
        assignment[name] = [order[k::n_folds] for k in range(n_folds)]
    folds = []
    for k in range(n_folds):
        train, val, test = [], [], []
        for name, parts in assignment.items():
            test += parts[k]
            rest = [g for j, part in enumerate(parts) if j != k for g in part]
            n_val = min(len(rest) - 1, max(1, int(round(val_fraction * len(rest))))) if len(rest) >= 2 else 0
            val += rest[:n_val]
            train += rest[n_val:]
        folds.append(GeneFold(k, tuple(sorted(train)), tuple(sorted(val)), tuple(sorted(test))))
    return folds


def token_labels(cells: EncodedCells, gene_class: Mapping[int, int]) -> list[np.ndarray]:
    """Per cell, the class id of each token whose gene is in ``gene_class`` (token id -> class
    id), else :data:`IGNORE_INDEX`."""
    lookup = np.full(int(cells.flat.max(initial=0)) + 1, IGNORE_INDEX, dtype=np.int64)
    for token, label in gene_class.items():
        if token < len(lookup):
            lookup[token] = label
    return [lookup[cells.tokens(i)] for i in range(len(cells))]


class _TokenSet(torch.utils.data.Dataset):
    """Cells with at least one labelled token, with their token labels."""

    def __init__(self, cells: EncodedCells, labels: list[np.ndarray]) -> None:
        self.cells = cells
        self.rows = [i for i, lab in enumerate(labels) if (lab != IGNORE_INDEX).any()]
        self.labels = labels

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict:
        row = self.rows[i]
        return {"input_ids": self.cells.tokens(row), "labels": self.labels[row], "row": row}


def _collate(items: Sequence[dict]) -> dict:
    width = max(len(item["input_ids"]) for item in items)
    ids = torch.zeros(len(items), width, dtype=torch.long)
    mask = torch.zeros(len(items), width, dtype=torch.long)
    labels = torch.full((len(items), width), IGNORE_INDEX, dtype=torch.long)
    for j, item in enumerate(items):
        n = len(item["input_ids"])
        ids[j, :n] = torch.from_numpy(np.asarray(item["input_ids"], dtype=np.int64))
        mask[j, :n] = 1
        labels[j, :n] = torch.from_numpy(item["labels"])
    return {"input_ids": ids, "attention_mask": mask, "labels": labels,
            "rows": torch.tensor([item["row"] for item in items])}


# ----------------------------------------------------------------------------- predictions
def gene_level_predictions(model, data: _TokenSet, *, num_classes: int, batch_size: int, device: torch.device,
                           precision: str = "fp32", progress: bool = False,
                           desc: str = "genes") -> dict[int, tuple[np.ndarray, int]]:
    """Token id -> (mean class probability over its labelled occurrences, occurrences)."""
    sums: dict[int, np.ndarray] = {}
    counts: dict[int, int] = {}
    loader = torch.utils.data.DataLoader(data, batch_size=batch_size, shuffle=False, collate_fn=_collate)
    model.eval()
    with torch.no_grad():
        for batch in tqdm(loader, desc=desc, disable=None if progress else True, leave=False):
            with autocast(device, precision):
                logits = model(batch["input_ids"].to(device), batch["attention_mask"].to(device)).logits
            probs = torch.softmax(logits.float(), dim=-1).cpu().numpy()
            picked = (batch["labels"] != IGNORE_INDEX).numpy()
            tokens = batch["input_ids"].numpy()[picked]
            values = probs[picked]
            for token in np.unique(tokens):
                sel = tokens == token
                sums[int(token)] = sums.get(int(token), np.zeros(num_classes)) + values[sel].sum(axis=0)
                counts[int(token)] = counts.get(int(token), 0) + int(sel.sum())
    return {t: (sums[t] / counts[t], counts[t]) for t in sums}


def _gene_metrics(truth: np.ndarray, probs: np.ndarray, names: list[str]) -> dict[str, Any]:
    from sklearn.metrics import roc_auc_score

    preds = probs.argmax(axis=1)
    metrics = classification_metrics(truth, preds, label_names=names, probabilities=probs)
    present = np.unique(truth)
    if len(names) == 2:
        metrics["roc_auc"] = float(roc_auc_score(truth, probs[:, 1])) if len(present) == 2 else float("nan")
    elif len(present) == len(names):
        metrics["roc_auc"] = float(roc_auc_score(truth, probs, multi_class="ovr", average="macro"))
    else:
        metrics["roc_auc"] = float("nan")
    metrics["n_genes"] = metrics.pop("n_cells", len(truth))  # the samples here are genes
    metrics["headline"] = "roc_auc" if len(names) == 2 else "macro_f1"
    metrics["headline_value"] = metrics[metrics["headline"]]
    return metrics


def _plot_roc(truth: np.ndarray, probs: np.ndarray, names: list[str], path: Path, title: str) -> Path | None:
    if not plotting_available():
        return None
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from sklearn.metrics import roc_auc_score, roc_curve

    figure = Figure(figsize=(5, 4.5), layout="constrained")
    FigureCanvasAgg(figure)
    ax = figure.add_subplot()
    targets = [1] if len(names) == 2 else range(len(names))
    for c in targets:
        positive = truth == c
        if positive.all() or not positive.any():
            continue
        fpr, tpr, _ = roc_curve(positive, probs[:, c])
        ax.plot(fpr, tpr, label=f"{names[c]} (AUC {roc_auc_score(positive, probs[:, c]):.3f})")
    ax.plot([0, 1], [0, 1], color="gray", lw=0.8, ls="--")
    ax.set_xlabel("false positive rate")
    ax.set_ylabel("true positive rate")
    ax.set_title(title)
    ax.legend(loc="lower right", fontsize=8)
    figure.savefig(path, dpi=120)
    return path


# ----------------------------------------------------------------------------- run
@dataclass
class GeneClassOptions:
    """What to run: classes file, cells, checkpoint, method, folds, output."""

    gene_classes: Path
    input: Path
    model_path: Path
    output_path: Path
    n_folds: int = 5
    folds: list[int] | None = None
    config_path: Path | None = None
    prompt_type: str | None = None
    token_dictionary: Path | None = None
    max_cells: int | None = None
    overwrite: bool = False
    training: TrainingArguments = field(default_factory=lambda: TrainingArguments(epochs=3, batch_size=16))
    allow_low_gene_overlap: bool = False  # go on when few of the cells' genes have pretrained rows (checks/)


def run_directory(opts: GeneClassOptions, prompt_type: str) -> Path:
    method = "_".join(p for p in prompt_type.split(",") if p) or "full_finetune"
    return Path(opts.output_path) / method


def _vocabulary(opts: GeneClassOptions) -> tuple[dict[str, int], str]:
    source = Path(opts.token_dictionary) if opts.token_dictionary else Path(opts.model_path) / "tokenizer.json"
    if not source.exists():
        raise FileNotFoundError(f"no gene vocabulary: {source} does not exist; pass --token_dictionary (the "
                                "token_dictionary.pkl or tokenizer.json the cells were tokenized with)")
    return load_token_dictionary(source), str(source)


def run_gene_classification(opts: GeneClassOptions) -> dict[str, Any]:
    """Train and test every gene fold; return the summary over folds (also written)."""
    args = opts.training
    if not Path(opts.input).exists():
        raise FileNotFoundError(f"--input {opts.input} does not exist; expected a tokenized dataset "
                                "(save_to_disk folder with input_ids)")
    probe = resolve_config(opts.model_path, config_path=opts.config_path, prompt_type=opts.prompt_type)
    vocab, vocab_source = _vocabulary(opts)
    classes = load_gene_classes(opts.gene_classes, vocab, n_folds=opts.n_folds, vocabulary_source=vocab_source)
    names = list(classes)
    folds = split_genes(classes, opts.n_folds, seed=args.seed)
    chosen = opts.folds if opts.folds is not None else list(range(opts.n_folds))
    bad = [f for f in chosen if not 0 <= f < opts.n_folds]
    if bad:
        raise ValueError(f"--folds {bad}: expected fold numbers in 0..{opts.n_folds - 1}")
    run_dir = run_directory(opts, probe.prompt_type if probe.peft_methods else "")
    lock = acquire_run_lock(run_dir)  # one job per run folder
    handler, root_level = None, None
    try:
        handler, root_level = attach_log_file(run_dir / "run.log")
        clean_stale_temps(run_dir)
        cache = FileHashCache(run_dir / ".cache" / "file_hashes.json")
        record = command_provenance("classify-genes", option_settings(opts),
                                    {"gene_classes": opts.gene_classes, "input": opts.input,
                                     "model_path": opts.model_path, "config": opts.config_path,
                                     "token_dictionary": vocab_source}, cache=cache)
        cache.save()
        refuse_changed_gene_folds(opts, run_dir, chosen, record)
        split_record = {"classes": names, "seed": args.seed, "n_folds": opts.n_folds,
                        "folds": [f.to_dict() for f in folds]}
        previous = run_dir / "folds.json"
        if previous.is_file() and not opts.overwrite:
            old = json.loads(previous.read_text(encoding="utf-8"))
            if old != split_record:
                raise DataError(f"{previous} records other gene folds (classes, seed or --n_folds changed) than "
                                f"this run's; use another --output_path or pass --overwrite")
        write_json(previous, split_record)
        dataset = load_saved_dataset(opts.input)
        if "input_ids" not in dataset.column_names:
            raise DataError(f"{opts.input}: no input_ids column; expected a tokenized dataset "
                            f"(columns: {dataset.column_names})")
        if opts.max_cells is not None and len(dataset) > opts.max_cells:
            dataset = dataset.select(range(opts.max_cells))
        max_length = args.max_length or probe.max_position_embeddings
        check_compatibility(opts.model_path, {str(opts.input): dataset}, config=probe,
                            token_dictionary=opts.token_dictionary, max_length=max_length,
                            allow_low_gene_overlap=opts.allow_low_gene_overlap, training=True).raise_if_refused()
        cells = EncodedCells.from_dataset(dataset, max_length=max_length, name=str(opts.input))
        check_checkpoint_data(cells, probe, opts.model_path, opts.token_dictionary)
        top = int(cells.flat.max(initial=0))
        if top >= probe.vocab_size:
            raise DataError(f"{opts.input} holds token id {top}, but the model at {opts.model_path} has vocab_size "
                            f"{probe.vocab_size}; tokenize with the checkpoint's own token dictionary")
        logger.info("gene classification: %d classes %s, %d genes, %d cells, folds %s -> %s", len(names),
                    {n: len(g) for n, g in classes.items()}, sum(len(g) for g in classes.values()), len(cells),
                    chosen, run_dir)
        device = resolve_device(args.device)
        fold_metrics = []
        for k in chosen:
            fold_dir = run_dir / str(k)
            if is_fold_done(fold_dir) and not opts.overwrite:
                logger.info("fold %d: finished earlier, skipped (%s); pass --overwrite to redo it", k, fold_dir)
                metrics = json.loads((fold_dir / "metrics.json").read_text(encoding="utf-8"))
            else:
                if fold_dir.exists() and not is_fold_done(fold_dir):
                    shutil.rmtree(fold_dir)  # an unfinished fold is redone from the start
                # with --overwrite the finished fold stays until the new one is complete
                metrics = train_gene_fold(opts, folds[k], classes, vocab, cells, fold_dir, device, provenance=record)
            fold_metrics.append(metrics)
        summary = summarize_folds(fold_metrics, chosen)
        write_summary(run_dir, summary)
        table = format_summary_table(summary)
        logger.info("summary over %d gene folds (%s):\n%s", len(chosen), run_dir, table)
        summary.update(table=table, run_dir=str(run_dir))
        return summary
    finally:
        if handler is not None:
            detach_log_file(handler, root_level)
        release_run_lock(lock)


def refuse_changed_gene_folds(opts: GeneClassOptions, run_dir: Path, chosen: Sequence[int], record: dict) -> None:
    """Refuse a rerun whose settings or inputs differ from those of the finished folds it would
    reuse (without ``--overwrite``), naming every differing setting.

    Raises
    ------
    SettingsChanged
        Naming each fold, every differing key with both values, and the ways forward.
    """
    if opts.overwrite:
        return
    refusals = []
    for k in chosen:
        fold_dir = run_dir / str(k)
        if not is_fold_done(fold_dir):
            continue
        recorded = read_provenance(fold_dir)
        if recorded is None:
            logger.warning("gene fold %d (%s) has no %s (written by an older version): its settings cannot be "
                           "checked against this run's", k, fold_dir, PROVENANCE_FILE)
            continue
        diffs = compare_settings(recorded["settings"], record["settings"])
        if diffs:
            refusals.append(f"  fold {k} (finished, {fold_dir}):\n{differing_keys_message(diffs)}")
    if refusals:
        raise SettingsChanged(
            f"{run_dir} holds gene folds made with other settings than this command's; refusing to reuse them "
            f"({len(refusals)} fold{'s' if len(refusals) != 1 else ''}):\n" + "\n".join(refusals) +
            "\nEither pass --overwrite to redo these folds with the new settings, or write the new run elsewhere "
            "with another --output_path (the existing results stay as they are).")


def train_gene_fold(opts: GeneClassOptions, fold: GeneFold, classes: Mapping[str, Sequence[str]],
                    vocab: Mapping[str, int], cells: EncodedCells, fold_dir: Path,
                    device: torch.device, provenance: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Train on the fold's training genes, pick the epoch on its validation genes, predict its
    test genes; write the fold folder; return its metrics."""
    from transformerslocal import BertForTokenClassification, mark_trainable

    args = opts.training
    names = list(classes)
    class_of = {g: i for i, (name, genes) in enumerate(classes.items()) for g in genes}
    set_seed(args.seed + fold.fold)
    config = resolve_config(opts.model_path, config_path=opts.config_path, prompt_type=opts.prompt_type,
                            label2id={n: i for i, n in enumerate(names)})
    model = BertForTokenClassification.from_pretrained(opts.model_path, config=config)
    report = mark_trainable(model)
    logger.info("gene fold %d: %d train, %d val, %d test genes; %s", fold.fold, len(fold.train), len(fold.val),
                len(fold.test), report)
    model.to(device)
    sets = {name: _TokenSet(cells, token_labels(cells, {vocab[g]: class_of[g] for g in genes}))
            for name, genes in (("train", fold.train), ("val", fold.val), ("test", fold.test))}
    if not len(sets["train"]):
        raise DataError(f"gene fold {fold.fold}: no cell of {opts.input} holds a training gene; expected the "
                        "classes' genes among the cells' tokens")
    generator = torch.Generator().manual_seed(args.seed + fold.fold)
    loader = torch.utils.data.DataLoader(sets["train"], batch_size=args.batch_size, shuffle=True,
                                         collate_fn=_collate, generator=generator)
    optimizer = make_optimizer(model, lr=args.lr, weight_decay=args.weight_decay, layer_decay=args.layer_decay)
    total = args.epochs * len(loader)
    scheduler = make_scheduler(optimizer, total, warmup_steps=args.warmup_steps, warmup_ratio=args.warmup_ratio,
                               schedule=args.lr_schedule, lr_end=args.lr_end)
    trainable = [p for p in model.parameters() if p.requires_grad]
    history, best_state, best_score, stale = [], None, -math.inf, 0
    t0 = time.perf_counter()
    for epoch in range(1, args.epochs + 1):
        model.train()
        loss_sum, steps = 0.0, 0
        for batch in tqdm(loader, desc=f"gene fold {fold.fold} epoch {epoch}", leave=False,
                          disable=None if args.progress else True):
            with autocast(device, args.precision):
                logits = model(batch["input_ids"].to(device), batch["attention_mask"].to(device)).logits
            loss = F.cross_entropy(logits.float().flatten(0, 1), batch["labels"].to(device).flatten(),
                                   ignore_index=IGNORE_INDEX)
            if not torch.isfinite(loss):
                raise TrainingDiverged(f"gene fold {fold.fold}: loss is {loss.item()} at epoch {epoch}; lower --lr")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if args.max_grad_norm:
                torch.nn.utils.clip_grad_norm_(trainable, args.max_grad_norm)
            optimizer.step()
            scheduler.step()
            loss_sum, steps = loss_sum + loss.item(), steps + 1
        record = {"epoch": epoch, "train_loss": loss_sum / max(steps, 1), "lr": scheduler.get_last_lr()[-1]}
        if len(sets["val"]):
            _, val_truth, val_probs, _ = _evaluate(model, sets["val"], fold.val, vocab, class_of, len(names), args,
                                                device)
            val = _gene_metrics(val_truth, val_probs, names)
            record.update(val_roc_auc=val["roc_auc"], val_macro_f1=val["macro_f1"])
            score = val["headline_value"] if not math.isnan(val["headline_value"]) else val["macro_f1"]
        else:
            score = epoch  # no validation genes: keep the last epoch
        history.append(record)
        logger.info("gene fold %d epoch %d: %s", fold.fold, epoch,
                    ", ".join(f"{k} {v:.4g}" for k, v in record.items() if k != "epoch"))
        if score > best_score:
            best_score, stale, best_epoch = score, 0, epoch
            best_state = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
        else:
            stale += 1
            if args.early_stopping_patience and stale >= args.early_stopping_patience:
                logger.info("gene fold %d: early stop after epoch %d", fold.fold, epoch)
                break
    train_seconds = time.perf_counter() - t0
    model.load_state_dict(best_state, strict=False)
    genes, truth, probs, occurrences = _evaluate(model, sets["test"], fold.test, vocab, class_of, len(names), args, device)
    if not genes:
        raise DataError(f"gene fold {fold.fold}: none of its {len(fold.test)} test genes occurs in {opts.input}")
    metrics = _gene_metrics(truth, probs, names)
    metrics.update(report.to_dict())
    metrics.update({"n_test_genes": len(genes), "n_test_genes_absent": len(fold.test) - len(genes),
                    "best_epoch": best_epoch, "epochs_run": len(history), "train_seconds": train_seconds,
                    "prompt_type": config.prompt_type if config.peft_methods else ""})
    with atomic_directory(fold_dir, overwrite=opts.overwrite) as tmp:
        if provenance is not None:
            write_json(tmp / PROVENANCE_FILE, provenance)
        rows = ["gene,true_class,predicted_class,occurrences," + ",".join(f"prob_{n}" for n in names)]
        for gene, t, p in zip(genes, truth, probs):
            rows.append(f"{gene},{names[t]},{names[int(p.argmax())]},{occurrences[gene]},"
                        + ",".join(f"{v:.6f}" for v in p))
        (tmp / "gene_predictions.csv").write_text("\n".join(rows) + "\n", encoding="utf-8")
        write_json(tmp / "metrics.json", metrics)
        write_json(tmp / "history.json", history)
        plot_confusion_matrix(np.asarray(metrics["confusion_matrix"]), names, tmp / "confusion_matrix.png",
                              title=f"gene fold {fold.fold} ({metrics['prompt_type'] or 'full'})")
        _plot_roc(truth, probs, names, tmp / "roc.png", title=f"gene fold {fold.fold}: ROC over test genes")
        mark_fold_done(tmp, info={"fold": fold.fold, metrics["headline"]: metrics["headline_value"]})
    logger.info("gene fold %d: test %s %.4f, macro-F1 %.4f over %d genes -> %s", fold.fold, metrics["headline"],
                metrics["headline_value"], metrics["macro_f1"], len(genes), fold_dir)
    return metrics


def _evaluate(model, data: _TokenSet, genes: Sequence[str], vocab: Mapping[str, int], class_of: Mapping[str, int],
              num_classes: int, args: TrainingArguments, device) -> tuple[list[str], np.ndarray, np.ndarray, dict]:
    """(genes found, their class ids, their mean probabilities, their occurrences) of one gene set."""
    by_token = gene_level_predictions(model, data, num_classes=num_classes,
                                      batch_size=args.eval_batch_size or args.batch_size, device=device,
                                      precision=args.precision)
    found = [g for g in genes if vocab[g] in by_token]
    truth = np.array([class_of[g] for g in found], dtype=np.int64)
    probs = np.stack([by_token[vocab[g]][0] for g in found]) if found else np.zeros((0, num_classes))
    return found, truth, probs, {g: by_token[vocab[g]][1] for g in found}
