"""Compatibility of a model and the data it is given, checked before any work.

:func:`check_compatibility` is the one entry point: ``finetune``, ``predict``, ``embed``,
``perturb``, ``classify-genes``, ``search``, ``pretrain`` and ``geneformer-peft check`` call it
with what they resolved (the model folder and config, the datasets, the token dictionary) and
get a :class:`CompatibilityReport`. ``report.raise_if_refused()`` logs the warnings and stops a
command with exit code 2 on any refusal. The checks and their JSON are described in
docs/own_data.md and docs/outputs.md.
"""
from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from geneformer_peft.checks.checkpoint import (
    check_base_model,
    check_checkpoint_shapes,
    check_token_dictionary,
    checkpoint_token_dictionary,
)
from geneformer_peft.checks.data import (
    MIN_GENE_OVERLAP,
    check_tokenized_with,
    check_encoding,
    check_labels,
    check_recorded_vocabulary,
    check_token_ids,
    check_truncation,
    check_vocabulary,
)
from geneformer_peft.checks.memory import check_memory
from geneformer_peft.checks.report import REPORT_FILE, CompatibilityReport, Finding, IncompatibleData
from geneformer_peft.data.vocab import is_special_token

__all__ = ["MIN_GENE_OVERLAP", "REPORT_FILE", "CompatibilityReport", "Finding", "IncompatibleData",
           "check_compatibility"]


def _vocab_size(config: Any) -> int:
    return int(getattr(config, "vocab_size", None) or getattr(config, "num_tokens"))


def check_compatibility(model_path: str | Path, datasets: Mapping[str, Any], *, config: Any = None,
                        token_dictionary: str | Path | Mapping[str, int] | None = None,
                        label_column: str | None = None, train_split: str | None = "train",
                        max_length: int | None = None, min_gene_overlap: float = MIN_GENE_OVERLAP,
                        allow_low_gene_overlap: bool = False, fold_path: str | Path | None = None,
                        base_model: str | Path | None = None, allow_other_base: bool = False,
                        resize_vocab: bool | None = None, check_shapes: bool = True,
                        training: bool = False, data_name: str | None = None) -> CompatibilityReport:
    """Check that ``datasets`` fit the model at ``model_path``.

    Parameters
    ----------
    model_path
        The checkpoint (or fine-tuned fold) folder whose config describes the model.
    datasets
        Name -> ``datasets.Dataset`` (e.g. ``{"train": ..., "val": ..., "test": ...}`` or
        ``{"input": ...}``); names appear in the messages.
    config
        The model config the command resolved (default: the checkpoint's own ``config.json``).
    token_dictionary
        The data's token dictionary (path or dict); default: the checkpoint's ``tokenizer.json``.
    label_column
        Check labels (missing values, a single class, rare or absent classes) in this column.
    train_split
        The dataset the model learns from (labels absent from it are named); ``None``: none.
    max_length
        Tokens the model reads per cell (default: the family's input length of ``config``).
    min_gene_overlap, allow_low_gene_overlap
        Refuse when fewer than this share of the data's genes have pretrained rows, unless allowed.
    fold_path, base_model, allow_other_base
        For a fold's PEFT-only weights on ``base_model`` (whose weights are then the ones checked):
        compare the base's SHA-256 with the one the fold recorded, refuse a different base unless
        allowed.
    resize_vocab
        ``pretrain`` only: whether the new model is sized to the dictionary.
    check_shapes
        Compare ``config.json`` with the weights' shapes (off when the weights are not read, e.g.
        ``pretrain`` from a config alone).
    training
        The model will be trained: its gradients and optimizer state count in the memory check.
    data_name
        How the report names the data (default: the dataset names).

    Returns
    -------
    CompatibilityReport
        Every finding; nothing is raised here (call ``raise_if_refused``).
    """
    from geneformer_peft.data.vocab import load_token_dictionary
    from geneformer_peft.models.families import family_of, family_of_config
    from geneformer_peft.models.vocabulary import new_gene_rows

    model_path = Path(model_path)
    weights_path = Path(base_model) if base_model is not None else model_path  # PEFT-only folds: the base's
    family = family_of_config(config) if config is not None else family_of(model_path)
    if config is None:
        config = family.config_class.from_pretrained(model_path)
    report = CompatibilityReport(model_path=str(model_path), data=data_name or ", ".join(datasets),
                                 family=family.model_type[0])
    shapes = check_checkpoint_shapes(report, weights_path, config) if check_shapes else None
    check_memory(report, family, config, training=training, weight_shapes=shapes)
    if base_model is not None:
        check_base_model(report, fold_path or model_path, base_model, allow_other_base=allow_other_base)
    check_encoding(report, datasets, family.encoding)
    vocab_size = _vocab_size(config)
    length = max_length or family.input_length(config)
    check_token_ids(report, datasets, vocab_size=vocab_size,
                    max_length=None if family.fixed_length else family.data_length(length))

    pretrained_ids = id_to_gene = None
    special_ids: set[int] = set()
    if family.encoding == "rank_value":
        own, own_source = checkpoint_token_dictionary(model_path)
        if own is None and base_model is not None:
            own, own_source = checkpoint_token_dictionary(base_model)
        if token_dictionary is None:
            dictionary, source = own, own_source
        elif isinstance(token_dictionary, Mapping):
            dictionary, source = dict(token_dictionary), "the token dictionary"
        else:
            dictionary, source = load_token_dictionary(token_dictionary), str(token_dictionary)
        if dictionary is not None:
            from geneformer_peft.models.generation import model_version

            version = model_version(config, own, dictionary)
            check_token_dictionary(report, dictionary, source,
                                   checkpoint_dictionary=own if source != own_source else None,
                                   checkpoint_source=own_source, vocab_size=vocab_size, model_version=version,
                                   resize=resize_vocab)
            check_tokenized_with(report, datasets, dictionary, source)
            special_ids = {int(v) for k, v in dictionary.items() if is_special_token(str(k))}
            id_to_gene = {int(v): str(k) for k, v in dictionary.items()}
        if own is not None:
            new = new_gene_rows(weights_path) | new_gene_rows(model_path)
            pretrained_ids = {int(v) for k, v in own.items() if not is_special_token(str(k)) and str(k) not in new}
        check_vocabulary(report, datasets, pretrained_ids=pretrained_ids, id_to_gene=id_to_gene,
                         special_ids=special_ids, min_overlap=min_gene_overlap,
                         allow_low_overlap=allow_low_gene_overlap)
        check_truncation(report, datasets, length)
    elif family.values_column is not None:  # CellFM: the data's recorded vocabulary against the checkpoint's
        own, own_source = checkpoint_token_dictionary(weights_path)
        check_recorded_vocabulary(report, datasets, own, own_source)
    if label_column is not None:
        check_labels(report, datasets, label_column, train=train_split if train_split in datasets else None)
    return report
