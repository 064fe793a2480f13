"""Model families: what differs between a Geneformer (BERT), a scBERT (Performer) and a CellFM
checkpoint for the job, chosen by the ``model_type`` of the checkpoint's ``config.json``.

The rest of the application asks the :class:`Family` of a checkpoint (:func:`family_of`) or of a
loaded config (:func:`family_of_config`) for its classes, its head and its input length, and names
no family itself.
"""
from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from transformerslocal import (
    BertConfig,
    BertForMaskedLM,
    BertForSequenceClassification,
    CellFMConfig,
    CellFMForMaskedValues,
    CellFMForSequenceClassification,
    PerformerConfig,
    PerformerForMaskedLM,
    PerformerForSequenceClassification,
)
from transformerslocal.configuration_bert import PEFT_DEFAULTS
from transformerslocal.configuration_cellfm import HEAD_KEYS as CELLFM_HEAD_KEYS
from transformerslocal.configuration_cellfm import PEFT_SHARED_DEFAULTS as CELLFM_PEFT_SHARED
from transformerslocal.configuration_performer import PEFT_SHARED_DEFAULTS
from transformerslocal.peft.registry import config_defaults

__all__ = ["FAMILIES", "Family", "check_input_lengths", "family_of", "family_of_config", "model_type_of"]


@dataclass(frozen=True)
class Family:
    """One model family.

    Parameters
    ----------
    model_type
        The ``config.json`` ``model_type`` values of the family (the first is written).
    config_class, classifier_class, masked_lm_class
        Its config and model classes.
    head_prefix
        Name prefix of the classifier head's parameters.
    head_out_weight
        The head's last weight (its shape says the number of labels).
    shape_keys
        Architecture keys a ``--config`` file must agree on with the checkpoint.
    peft_keys
        The config keys a ``--config`` file contributes (PEFT method keys and freezing; CellFM's
        classifier head choice too).
    input_length
        ``input_length(config)``: the longest input the classifier takes.
    fixed_length
        Whether every cell must have exactly ``input_length`` tokens (no truncation, no padding).
    encoding
        The encoding of the cells it reads, as tokenizers record it in a dataset's summary
        (``"rank_value"``, ``"binned"``, ``"cellfm"``).
    values_column
        The dataset column of each gene token's expression value the model reads beside the ids
        (CellFM: ``"values"``); ``None`` when it reads token ids only.
    added_tokens
        Positions the model puts in front of a cell's tokens itself (CellFM's cls: 1), so that a
        cell of ``input_length(config)`` positions reads ``input_length(config) - added_tokens``
        tokens of the dataset (:meth:`data_length`).
    """

    model_type: tuple[str, ...]
    config_class: type
    classifier_class: type
    masked_lm_class: type
    head_prefix: str
    head_out_weight: str
    shape_keys: tuple[str, ...]
    peft_keys: tuple[str, ...]
    input_length: Callable[[Any], int]
    fixed_length: bool
    encoding: str = "rank_value"
    values_column: str | None = None
    added_tokens: int = 0

    def data_length(self, length: int) -> int:
        """The dataset tokens per cell of an input of ``length`` positions (``--max_length``,
        ``max_position_embeddings``): ``length - added_tokens``."""
        return int(length) - self.added_tokens


BERT = Family(
    model_type=("bert",),
    config_class=BertConfig,
    classifier_class=BertForSequenceClassification,
    masked_lm_class=BertForMaskedLM,
    head_prefix="classifier.",
    head_out_weight="classifier.weight",
    shape_keys=("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size"),
    peft_keys=tuple(PEFT_DEFAULTS),
    input_length=lambda config: config.finetune_max_length or config.max_position_embeddings,
    fixed_length=False,
)
SCBERT = Family(
    model_type=("scbert",),
    config_class=PerformerConfig,
    classifier_class=PerformerForSequenceClassification,
    masked_lm_class=PerformerForMaskedLM,
    head_prefix="to_out.",
    head_out_weight="to_out.fc3.weight",
    shape_keys=("num_tokens", "max_seq_len", "dim", "depth", "heads", "dim_head"),
    peft_keys=tuple(PEFT_SHARED_DEFAULTS) + tuple(config_defaults()),
    input_length=lambda config: config.max_seq_len,
    fixed_length=True,
    encoding="binned",
)
CELLFM = Family(
    model_type=("cellfm",),
    config_class=CellFMConfig,
    classifier_class=CellFMForSequenceClassification,
    masked_lm_class=CellFMForMaskedValues,
    head_prefix="classifier.",
    head_out_weight="classifier.out.weight",
    shape_keys=("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
                "value_slots"),
    peft_keys=tuple(CELLFM_PEFT_SHARED) + tuple(config_defaults()) + CELLFM_HEAD_KEYS,
    input_length=lambda config: config.finetune_max_length or config.max_position_embeddings,
    fixed_length=False,
    encoding="cellfm",
    values_column="values",
    added_tokens=1,
)
#: every family, by the ``model_type`` values it reads
FAMILIES: dict[str, Family] = {t: f for f in (BERT, SCBERT, CELLFM) for t in f.model_type}


def model_type_of(path: str | Path) -> str:
    """The ``model_type`` of a checkpoint folder's ``config.json`` (or of a config file);
    ``"bert"`` when the key is absent (Geneformer's files name it)."""
    path = Path(path)
    file = path / "config.json" if path.is_dir() else path
    if not file.is_file():
        raise FileNotFoundError(f"no config found: looked for {file}")
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ValueError(f"{file} is not valid JSON: {err}") from err
    return str(data.get("model_type", "bert")) if isinstance(data, dict) else "bert"


def family_of(path: str | Path) -> Family:
    """The family of the checkpoint at ``path``, from its ``config.json`` ``model_type``.

    Raises
    ------
    ValueError
        If the ``model_type`` is none of :data:`FAMILIES`.
    """
    model_type = model_type_of(path)
    if model_type not in FAMILIES:
        raise ValueError(f"{path}: config.json has model_type {model_type!r}; expected one of {sorted(FAMILIES)}")
    return FAMILIES[model_type]


def family_of_config(config: Any) -> Family:
    """The family whose config class ``config`` is."""
    for family in FAMILIES.values():
        if isinstance(config, family.config_class):
            return family
    raise TypeError(f"no model family has config class {type(config).__name__}")


def check_input_lengths(config: Any, lengths: Any, *, source: str = "cells") -> None:
    """For a fixed-length family (scBERT), every cell must have exactly ``input_length(config)``
    tokens (``gene_num + 1``: tokenized with the model's gene panel, ``--encoding binned``).

    Raises
    ------
    DataError
        If a cell has another number of tokens.
    """
    import numpy as np

    from geneformer_peft.errors import DataError

    family = family_of_config(config)
    if not family.fixed_length:
        return
    want = family.input_length(config)
    lengths = np.asarray(lengths)
    wrong = np.flatnonzero(lengths != want)
    if wrong.size:
        raise DataError(f"{source}: {wrong.size} of {lengths.size} cells have another number of tokens than the "
                        f"model's {want} (gene_num + 1 of its gene panel), e.g. row {int(wrong[0])} with "
                        f"{int(lengths[wrong[0]])}; tokenize with `--encoding binned --gene_panel` of this model")
