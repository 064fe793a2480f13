"""Geneformer V1 or V2: which one a checkpoint is, which one tokenized data is, and a clear
refusal when they differ.

A model is **V2** when its ``config.json`` says ``"geneformer_version": 2`` (the V2 configs in
``Pretrain_ckpts/`` do); without that key, when its own vocabulary (the checkpoint's
``tokenizer.json``) holds ``<cls>`` and ``<eos>``, or its config asks for
``classifier_pooling: "cls"`` (which only V2 configs set, and which ``--config`` carries over
onto a checkpoint), or the run's ``--token_dictionary`` holds ``<cls>``/``<eos>`` and has
exactly the model's ``vocab_size`` entries; otherwise it is **V1**. Tokenized data is **V2** when every cell starts with the ``<cls>``
id (V2 dictionaries: ``<cls>`` 2, ``<eos>`` 3), **V1** when none does. V2 data on a V1
model (or the reverse) would train without an error and mean nothing: the special ids are
genes of the other vocabulary.
"""
from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from geneformer_peft.data.cells import EncodedCells
from geneformer_peft.data.vocab import CLS_TOKEN, EOS_TOKEN
from geneformer_peft.errors import DataError

__all__ = ["DEFAULT_CLS_ID", "DEFAULT_EOS_ID", "VERSION_KEY", "check_checkpoint_data", "check_data_version",
           "cls_token_id", "data_version", "model_version"]

#: config.json key naming the Geneformer generation (1 or 2)
VERSION_KEY = "geneformer_version"
#: ids of ``<cls>`` / ``<eos>`` in Geneformer's V2 dictionaries
DEFAULT_CLS_ID, DEFAULT_EOS_ID = 2, 3


def _version_of(value: Any) -> str | None:
    text = str(value).strip().upper().lstrip("V")
    return {"1": "V1", "2": "V2"}.get(text)


def model_version(config, vocabulary: Mapping[str, int] | None = None,
                  data_vocabulary: Mapping[str, int] | None = None) -> str:
    """``"V1"`` or ``"V2"`` (see the module docstring).

    Parameters
    ----------
    config
        The model's :class:`~transformerslocal.BertConfig`.
    vocabulary
        The model's own token dictionary, when known.
    data_vocabulary
        The dictionary the data was tokenized with, when known.

    Raises
    ------
    ValueError
        If ``geneformer_version`` holds something other than 1 or 2.
    """
    declared = getattr(config, VERSION_KEY, None)
    if declared is not None:
        version = _version_of(declared)
        if version is None:
            raise ValueError(f"config.json key {VERSION_KEY}={declared!r} is not valid; expected 1 or 2")
        return version
    if vocabulary is not None and CLS_TOKEN in vocabulary and EOS_TOKEN in vocabulary:
        return "V2"
    if getattr(config, "classifier_pooling", None) == "cls":
        return "V2"
    if (vocabulary is None and data_vocabulary is not None and CLS_TOKEN in data_vocabulary
            and EOS_TOKEN in data_vocabulary and len(data_vocabulary) == getattr(config, "vocab_size", None)):
        return "V2"
    return "V1"


def cls_token_id(config, vocabulary: Mapping[str, int] | None = None) -> int:
    """The ``<cls>`` id: the vocabulary's, else the config's ``cls_token_id``, else 2."""
    if vocabulary is not None and CLS_TOKEN in vocabulary:
        return int(vocabulary[CLS_TOKEN])
    value = getattr(config, "cls_token_id", None)
    return int(value) if value is not None else DEFAULT_CLS_ID


def data_version(cells: EncodedCells, cls_id: int) -> tuple[str, int, int]:
    """(``"V1"``, ``"V2"`` or ``"mixed"``, cells starting with ``cls_id``, non-empty cells)."""
    starts = cells.offsets[:-1][cells.lengths > 0]
    firsts = cells.flat[starts] if len(starts) else np.zeros(0, dtype=np.int64)
    n_cls, n = int((firsts == cls_id).sum()), len(firsts)
    if n and n_cls == n:
        return "V2", n_cls, n
    if n_cls == 0:
        return "V1", n_cls, n
    return "mixed", n_cls, n


def check_data_version(cells: EncodedCells, config, *, model_path: str | Path,
                       vocabulary: Mapping[str, int] | None = None,
                       data_vocabulary: Mapping[str, int] | None = None) -> str:
    """Refuse V1 data on a V2 model and V2 data on a V1 model; return the version.

    Parameters
    ----------
    cells
        Tokenized cells (``cells.name`` is used in messages).
    config
        The model's config.
    model_path
        The checkpoint folder (named in messages).
    vocabulary
        The model's token dictionary, when known.
    data_vocabulary
        The dictionary the data was tokenized with (``--token_dictionary``), when known: on a
        V1 model, data from a dictionary with ``<cls>`` is checked for that id.

    Raises
    ------
    DataError
        Naming the data, the model and both versions.
    """
    version = model_version(config, vocabulary, data_vocabulary)
    if version == "V2":
        cls_id = cls_token_id(config, vocabulary or data_vocabulary)
        found, n_cls, n = data_version(cells, cls_id)
        if found != "V2":
            raise DataError(
                f"{cells.name}: {n - n_cls} of {n} cells do not start with <cls> (id {cls_id}), so the data is "
                f"Geneformer {found} data, but the model at {model_path} is Geneformer V2; tokenize with "
                "`geneformer-peft tokenize --model_version V2` and the V2 dictionaries (or use a V1 model)")
        return version
    ids = [int(data_vocabulary[CLS_TOKEN])] if data_vocabulary is not None and CLS_TOKEN in data_vocabulary else []
    if not ids and len(cells) >= 2:
        ids = [DEFAULT_CLS_ID]
    for cls_id in ids:
        found, n_cls, n = data_version(cells, cls_id)
        if found == "V2" and (ids != [DEFAULT_CLS_ID] or _ends_with(cells, DEFAULT_EOS_ID)):
            raise DataError(
                f"{cells.name}: every cell starts with <cls> (id {cls_id}), so the data is Geneformer V2 data, but "
                f"the model at {model_path} is Geneformer V1 (no {VERSION_KEY}: 2 in its config.json and no "
                "<cls>/<eos> in its vocabulary); use a V2 model or tokenize with --model_version V1. If the model "
                f"is V2, add \"{VERSION_KEY}\": 2 to its config.json or pass --config "
                "Pretrain_ckpts/geneformer-V2-104M[-method]/config.json")
    return version


def _ends_with(cells: EncodedCells, eos_id: int) -> bool:
    """Whether every untruncated cell ends with ``eos_id`` (cells cut by max_length lose it)."""
    full = np.diff(cells.offsets)
    whole = (cells.lengths == full) & (full > 0)
    if not whole.any():
        return True
    return bool((cells.flat[cells.offsets[1:][whole] - 1] == eos_id).all())


def _load_vocabulary(path: Path) -> dict[str, int] | None:
    from geneformer_peft.data.vocab import load_token_dictionary

    return load_token_dictionary(path) if path.exists() else None


def check_checkpoint_data(cells: EncodedCells, config, model_path: str | Path,
                          token_dictionary: str | Path | None = None) -> str:
    """:func:`check_data_version` with the vocabularies read from disk: the checkpoint's
    ``tokenizer.json`` (if any) and the data's ``token_dictionary`` (if given). A model that
    reads expression values beside the ids (CellFM) has no V1/V2: its encoding is returned."""
    from geneformer_peft.models.families import family_of_config

    family = family_of_config(config)
    if family.values_column is not None:
        return family.encoding
    model_vocab = _load_vocabulary(Path(model_path) / "tokenizer.json")
    data_vocab = _load_vocabulary(Path(token_dictionary)) if token_dictionary is not None else None
    return check_data_version(cells, config, model_path=model_path, vocabulary=model_vocab,
                              data_vocabulary=data_vocab)
