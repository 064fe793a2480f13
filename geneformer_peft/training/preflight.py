"""Checks of every selected fold before the first one trains, and each fold's provenance.

A run over K folds can take hours per fold on real data; a bad file in the last fold must
not wait for the first K-1 to finish. :func:`check_folds` reads every selected fold's three
splits (Arrow columns only, memory-mapped: no token is copied) and reports all problems of
all folds in one :class:`~geneformer_peft.errors.DataError`:

- a split folder missing, not a saved dataset, unreadable or empty;
- the label column missing or holding missing values; no ``input_ids`` column;
- cells without a gene token; token ids negative or not below the model's ``vocab_size``
  (within the first ``max_length`` tokens, the ones the model reads);
- ``--max_length`` above the model's ``max_position_embeddings``.

Labels of val or test that train lacks are not an error (the model cannot predict them,
but the other classes' results stand); they are listed per fold in one warning up front
and repeated in ``summary.json`` (``labels_absent_from_train``).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from geneformer_peft.checks import CompatibilityReport, check_compatibility
from geneformer_peft.checks.data import token_id_problems
from geneformer_peft.data.dataset_io import load_saved_dataset
from geneformer_peft.data.folds import SPLITS, fold_paths
from geneformer_peft.errors import DataError
from geneformer_peft.training import provenance as prov

logger = logging.getLogger(__name__)

__all__ = ["FoldCheck", "check_folds", "fold_config", "label_ids", "vocabulary_source"]


@dataclass
class FoldCheck:
    """What :func:`check_folds` learnt about one fold."""

    fold: int
    provenance: dict | None = None
    absent_from_train: dict[str, list[str]] = field(default_factory=dict)  # split -> labels
    problems: list[str] = field(default_factory=list)
    compatibility: CompatibilityReport | None = None


def vocabulary_source(opts) -> Path | None:
    """The gene vocabulary of the run: ``--token_dictionary``, else the checkpoint's tokenizer.json."""
    if opts.token_dictionary is not None:
        return Path(opts.token_dictionary)
    candidate = Path(opts.model_path) / "tokenizer.json"
    return candidate if candidate.is_file() else None


def label_ids(labels) -> dict[str, int]:
    """Label name -> id, in sorted order of the names (as :func:`~geneformer_peft.data.folds.label_mapping`)."""
    return {str(label): i for i, label in enumerate(sorted(labels))}


def config_overrides(opts) -> dict:
    """The config keys the run's options set: ``config_overrides``, and ``classifier_pooling``
    from ``pooling`` when given."""
    overrides = dict(opts.config_overrides or {})
    if getattr(opts, "pooling", None) is not None:
        overrides["classifier_pooling"] = opts.pooling
    return overrides


def fold_config(base, opts, label2id: dict[str, int], tasks=None):
    """The fold's model config: ``base`` (the run's checkpoint config, resolved once by the job
    with the method keys and overrides applied) with the fold's labels and the
    ``finetune_max_length`` that prediction reuses; a multi-task run's ``tasks`` (a
    :class:`~geneformer_peft.training.multitask.TaskSet`) recorded under ``tasks``."""
    changes: dict[str, Any] = {"id2label": {int(i): str(name) for name, i in label2id.items()},
                               "label2id": {str(name): int(i) for name, i in label2id.items()}}
    if tasks is not None:
        changes["tasks"] = tasks.config_value()
    return base.copy(**changes, finetune_max_length=opts.training.max_length or base.max_position_embeddings)


def _fixed_length_problems(dataset, where: str, config) -> list[str]:
    """For a fixed-length model family (scBERT), cells of another number of tokens than the model's."""
    import pyarrow as pa

    from geneformer_peft.models.families import check_input_lengths, family_of_config

    if not family_of_config(config).fixed_length or "input_ids" not in dataset.column_names:
        return []
    column = dataset.data.column("input_ids")
    column = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    try:
        check_input_lengths(config, np.diff(column.offsets.to_numpy()), source=where)
    except DataError as error:
        return [str(error)]
    return []


def _mixed_label_types(column: str, values: dict[str, Any]) -> str | None:
    """The problem of a label column whose (non-missing) values are of several types across the
    splits, e.g. strings in train and integers in test; ``None`` when they are of one type."""
    from geneformer_peft.evaluation.tasks import is_missing

    kinds = {split: sorted({type(v).__name__ for v in vals if not is_missing(v)}) for split, vals in values.items()}
    if len({kind for names in kinds.values() for kind in names}) <= 1:
        return None
    return (f"label column {column!r} holds values of different types across the splits "
            f"({', '.join(f'{split}: {names}' for split, names in kinds.items())}); expected one type (e.g. all "
            "strings): tokenize and split the cells again from one labelled file")


def _check_fold(opts, fold: int, *, base_config, hashes: prov.FileHashCache, checkpoint: dict | None,
                token_dictionary: dict | None, environment: dict) -> FoldCheck:
    check = FoldCheck(fold)
    name = opts.dataset_name
    paths = fold_paths(opts.data_path, name, fold)
    datasets: dict[str, Any] = {}
    for split in SPLITS:
        try:
            datasets[split] = load_saved_dataset(paths[split])
        except DataError as error:
            check.problems.append(str(error))
    if check.problems:
        return check
    column = opts.label_column
    if not isinstance(column, str):
        return _check_multitask_fold(opts, check, paths, datasets, base_config=base_config, hashes=hashes,
                                     checkpoint=checkpoint,
                                     token_dictionary=token_dictionary, environment=environment)
    found: dict[str, set] = {}
    for split, dataset in datasets.items():
        where = f"{split} split {paths[split]}"
        if len(dataset) == 0:
            check.problems.append(f"{where}: holds no cells; expected at least one cell in every split")
        if column not in dataset.column_names:
            check.problems.append(f"{where}: label column {column!r} does not exist; expected one of "
                                  f"{dataset.column_names} (set --label_column)")
            continue
        found[split] = set(dataset.unique(column))
        if None in found[split]:
            check.problems.append(f"{where}: label column {column!r} holds missing values (None); expected a "
                                  "label per cell")
    if mixed := _mixed_label_types(column, found):
        check.problems.append(mixed)
    if check.problems:
        return check
    for split in ("val", "test"):
        absent = sorted(map(str, found[split] - found["train"]))
        if absent:
            check.absent_from_train[split] = absent
    try:
        config = fold_config(base_config, opts, label_ids(set().union(*found.values())))
    except (DataError, ValueError, FileNotFoundError) as error:
        check.problems.append(str(error))
        return check
    return _check_tokens_and_record(opts, check, paths, datasets, config, label_column=column, checkpoint=checkpoint,
                                    token_dictionary=token_dictionary, environment=environment)


def _check_tokens_and_record(opts, check: FoldCheck, paths, datasets, config, *, label_column, checkpoint,
                             token_dictionary, environment) -> FoldCheck:
    """The checks after the labels (length, token ids, compatibility) and the fold's provenance."""
    fold = check.fold
    column = label_column
    max_length = opts.training.max_length or config.max_position_embeddings
    if max_length > config.max_position_embeddings:
        check.problems.append(f"--max_length {max_length} exceeds the model's max_position_embeddings "
                              f"{config.max_position_embeddings}")
        return check
    for split, dataset in datasets.items():
        check.problems += token_id_problems(dataset, f"{split} split {paths[split]}", vocab_size=config.vocab_size,
                                            max_length=max_length)
        check.problems += _fixed_length_problems(dataset, f"{split} split {paths[split]}", config)
    if check.problems:
        return check
    check.compatibility = check_compatibility(
        opts.model_path, {f"{split} split {paths[split]}": ds for split, ds in datasets.items()}, config=config,
        token_dictionary=opts.token_dictionary, label_column=column if isinstance(column, str) else None,
        train_split=f"train split {paths['train']}",
        max_length=max_length, allow_low_gene_overlap=opts.allow_low_gene_overlap or opts.random_init, training=True,
        data_name=f"fold {fold} of {opts.dataset_name!r} under {opts.data_path}")
    check.problems += [f"{f.check}: {f.message}" for f in check.compatibility.refusals]
    if check.problems or checkpoint is None:
        return check
    data = prov.data_fingerprint(paths, datasets, column)
    check.provenance = prov.fold_provenance(opts, fold, config=config.to_dict(), data=data, checkpoint=checkpoint,
                                            token_dictionary=token_dictionary, environment=environment)
    return check


def _check_multitask_fold(opts, check: FoldCheck, paths, datasets, *, base_config, hashes, checkpoint,
                          token_dictionary, environment) -> FoldCheck:
    """The label checks of a multi-task fold: every task's column in every split, one value type
    per column, every cell with at least one task's label (a missing label counts for the other
    tasks only); then the same token checks and provenance as a single-task fold."""
    from geneformer_peft.training.multitask import TaskSet, is_missing

    columns = list(opts.label_column)
    for split, dataset in datasets.items():
        where = f"{split} split {paths[split]}"
        if len(dataset) == 0:
            check.problems.append(f"{where}: holds no cells; expected at least one cell in every split")
        absent = [c for c in columns if c not in dataset.column_names]
        if absent:
            check.problems.append(f"{where}: label column{'s' if len(absent) > 1 else ''} {absent} do not exist; "
                                  f"expected each of {columns} among {dataset.column_names} (set --label_column)")
            continue
        unlabelled = 0
        values = {c: dataset.data.column(c).to_pylist() for c in columns}
        for row in zip(*values.values()):
            unlabelled += all(is_missing(v) for v in row)
        if unlabelled:
            check.problems.append(f"{where}: {unlabelled} of {len(dataset)} cells have no label in any of the columns "
                                  f"{columns}; expected at least one label per cell (a cell missing one task's "
                                  "label counts for the other tasks only)")
    if check.problems:
        return check
    for column in columns:
        if mixed := _mixed_label_types(column, {split: ds.unique(column) for split, ds in datasets.items()}):
            check.problems.append(mixed)
        train = {str(v) for v in datasets["train"].unique(column) if not is_missing(v)}
        for split in ("val", "test"):
            absent = sorted({str(v) for v in datasets[split].unique(column) if not is_missing(v)} - train)
            if absent:
                check.absent_from_train[f"{split} {column}"] = absent
    if check.problems:
        return check
    try:
        tasks = TaskSet.from_datasets(datasets, columns)
        config = fold_config(base_config, opts, tasks.label2id, tasks=tasks)
    except (DataError, ValueError, FileNotFoundError) as error:
        check.problems.append(str(error))
        return check
    return _check_tokens_and_record(opts, check, paths, datasets, config, label_column=columns, checkpoint=checkpoint,
                                    token_dictionary=token_dictionary, environment=environment)


def check_folds(opts, folds: list[int], *, base_config, hash_cache: Path | None = None,
                environment: dict | None = None) -> list[FoldCheck]:
    """Check every fold of ``folds`` and build its provenance record.

    Parameters
    ----------
    opts
        The run's ``RunOptions``.
    folds
        Fold numbers to check.
    base_config
        The run's checkpoint config, resolved once by the job (each fold's adds its labels).
    hash_cache
        File of the :class:`~geneformer_peft.training.provenance.FileHashCache`.
    environment
        Recorded (not compared) in each provenance: library versions, device.

    Raises
    ------
    DataError
        Listing every problem of every fold (nothing has trained yet).
    """
    hashes = prov.FileHashCache(hash_cache)
    checkpoint = prov.checkpoint_fingerprint(opts.model_path, hashes)
    vocabulary = vocabulary_source(opts)
    token_dictionary = None
    if vocabulary is not None and vocabulary.is_file():
        token_dictionary = {"path": str(vocabulary.resolve()), "size": vocabulary.stat().st_size,
                            "sha256": hashes.sha256(vocabulary)}
    checks = [_check_fold(opts, fold, base_config=base_config, hashes=hashes, checkpoint=checkpoint,
                          token_dictionary=token_dictionary,
                          environment=environment or {}) for fold in folds]
    hashes.save()
    bad = [c for c in checks if c.problems]
    if bad:
        lines = [f"fold {c.fold}: {problem}" for c in bad for problem in c.problems]
        raise DataError(f"dataset {opts.dataset_name!r} under {opts.data_path}: {len(lines)} problem"
                        f"{'s' if len(lines) != 1 else ''} in fold{'s' if len(bad) != 1 else ''} "
                        f"{', '.join(str(c.fold) for c in bad)}, found before training any fold:\n  "
                        + "\n  ".join(lines))
    absent = {c.fold: c.absent_from_train for c in checks if c.absent_from_train}
    if absent:
        logger.warning("labels absent from train (the model cannot predict them; they count as errors in the "
                       "metrics): %s", "; ".join(f"fold {fold}: " + ", ".join(f"{split} has {labels}"
                                                                               for split, labels in by_split.items())
                                                 for fold, by_split in absent.items()))
    return checks
