"""A pretrained checkpoint put on another gene vocabulary.

Shared genes keep their embedding rows (matched by gene id), new genes start fresh, every
other weight is kept. A BERT's rows are ``*embeddings.word_embeddings.weight``, a CellFM's
``gene_emb`` (fresh rows xavier-normal, the pad row 0, as CellFM initialises it). Reading and writing weights go through
:mod:`transformerslocal.modeling_utils`, the one place that knows checkpoint files.
"""
from __future__ import annotations

import json
import logging
import math
from collections.abc import Mapping
from pathlib import Path

import torch

from geneformer_peft.data.vocab import (
    TOKENIZER_FILE,
    is_special_token,
    load_token_dictionary,
    save_tokenizer_json,
    validate_token_dictionary,
)
from geneformer_peft.errors import DataError
from geneformer_peft.files import atomic_directory, write_json
from transformerslocal.modeling_utils import (
    SAFE_WEIGHTS_NAME,
    WEIGHTS_NAME,
    find_weights_file,
    read_state_dict,
    write_state_dict,
)

logger = logging.getLogger(__name__)

__all__ = ["REMAP_RECORD", "new_gene_rows", "remap_checkpoint_vocabulary"]

#: written by remap-vocab beside the weights: which genes' rows are new (not pretrained)
REMAP_RECORD = "vocabulary_remap.json"

PathLike = str | Path

_EMBEDDING_SUFFIX = "embeddings.word_embeddings.weight"
#: CellFM's gene embedding (``model_type: "cellfm"``)
_CELLFM_EMBEDDING = "gene_emb"
_DECODER_WEIGHT = "cls.predictions.decoder.weight"
_VOCAB_BIASES = ("cls.predictions.bias", "cls.predictions.decoder.bias")


def new_gene_rows(model_path: str | Path) -> set[str]:
    """Genes whose embedding rows a ``remap-vocab`` initialised fresh (empty when never remapped)."""
    record = Path(model_path) / REMAP_RECORD
    if not record.is_file():
        return set()
    try:
        data = json.loads(record.read_text(encoding="utf-8"))
        return {str(g) for g in data["new_genes"]}
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise DataError(f"{record}: unreadable ({error}); expected the JSON remap-vocab writes") from None


def remap_checkpoint_vocabulary(
    checkpoint_dir: PathLike,
    new_token_dictionary: Mapping[str, int] | PathLike,
    output_dir: PathLike,
    *,
    old_token_dictionary: Mapping[str, int] | PathLike | None = None,
    pad_to_multiple_of: int | None = 8,
    seed: int = 0,
    min_gene_overlap: float = 0.0,
    allow_low_gene_overlap: bool = False,
    reinit_all_rows: bool = False,
) -> int:
    """Write a copy of a checkpoint whose word embeddings follow a new vocabulary.

    Works on the files (``config.json`` and the weights, found and read by
    :mod:`transformerslocal.modeling_utils`, safetensors preferred, shards merged); no model
    class is built. The output folder is built under a temporary name and renamed when complete. The new embedding matrix has
    ``len(new_token_dictionary)`` rows, padded up to a multiple of ``pad_to_multiple_of``.
    Rows of tokens present in both vocabularies (matched by gene id / token string) are
    copied; other rows are drawn from N(0, ``config["initializer_range"]``). The MLM output
    bias (``cls.predictions.bias``) is remapped the same way (new entries 0); a stored
    ``cls.predictions.decoder.weight`` is set to the new embeddings when it was tied to
    them, else remapped like them. Every other tensor is copied unchanged.

    Parameters
    ----------
    checkpoint_dir
        Directory of the pretrained checkpoint.
    new_token_dictionary
        The new vocabulary (dict or a path accepted by :func:`load_token_dictionary`).
    output_dir
        Where ``config.json`` (new ``vocab_size``), the weights (same format) and the new
        ``tokenizer.json`` are written.
    old_token_dictionary
        The checkpoint's vocabulary; default: the checkpoint's ``tokenizer.json``.
    pad_to_multiple_of
        Round the vocabulary size up to a multiple of this (``None``: no padding).
    seed
        Seed of the initialisation of new rows.
    min_gene_overlap, allow_low_gene_overlap
        Refuse (before writing anything) when fewer than this share of the new vocabulary's genes
        have a pretrained row to copy, or none has, unless allowed (``remap-vocab`` passes 0.5,
        the compatibility report's threshold; the function's default refuses only "none shared"). The genes whose rows start
        fresh are recorded in ``vocabulary_remap.json`` (the compatibility report reads it).
    reinit_all_rows
        Keep no pretrained row: the whole embedding starts fresh for the new vocabulary (CellFM's
        fine-tuning recipe; every gene is recorded as new, and no overlap is required).

    Returns
    -------
    int
        Number of genes (non-special tokens) shared by both vocabularies.
    """
    checkpoint_dir, output_dir = Path(checkpoint_dir), Path(output_dir)
    config_path = checkpoint_dir / "config.json"
    if not config_path.is_file():
        raise DataError(f"{checkpoint_dir}: checkpoint has no config.json; looked for {config_path}")
    config = json.loads(config_path.read_text())
    new_vocab = (
        validate_token_dictionary(new_token_dictionary, "new_token_dictionary")
        if isinstance(new_token_dictionary, Mapping)
        else load_token_dictionary(new_token_dictionary)
    )
    if old_token_dictionary is None:
        tokenizer_path = checkpoint_dir / TOKENIZER_FILE
        if not tokenizer_path.is_file():
            raise DataError(
                f"{checkpoint_dir}: old vocabulary unknown; looked for {tokenizer_path} "
                "(or pass old_token_dictionary)"
            )
        old_vocab = load_token_dictionary(tokenizer_path)
    else:
        old_vocab = (validate_token_dictionary(old_token_dictionary, "old_token_dictionary")
                     if isinstance(old_token_dictionary, Mapping) else load_token_dictionary(old_token_dictionary))
        own = checkpoint_dir / TOKENIZER_FILE
        if own.is_file() and load_token_dictionary(own) != old_vocab:
            raise DataError(f"--old_token_dictionary {old_token_dictionary if not isinstance(old_token_dictionary, Mapping) else '(dict)'} "
                            f"contradicts the checkpoint's own {own} (other tokens or ids): its embedding rows follow "
                            f"{own}; leave --old_token_dictionary out")

    weights_file = find_weights_file(checkpoint_dir)
    state = read_state_dict(weights_file)
    safe = weights_file.name.startswith(SAFE_WEIGHTS_NAME)
    weights_name = SAFE_WEIGHTS_NAME if safe else WEIGHTS_NAME
    cellfm = config.get("model_type") == "cellfm"
    if cellfm:
        embedding_keys = [k for k in state if k == _CELLFM_EMBEDDING]
    else:
        embedding_keys = [k for k in state if k.endswith(_EMBEDDING_SUFFIX)]
    if len(embedding_keys) != 1:
        wanted = _CELLFM_EMBEDDING if cellfm else f"*{_EMBEDDING_SUFFIX}"
        raise DataError(
            f"{checkpoint_dir / weights_name}: expected exactly one '{wanted}' tensor, "
            f"found {embedding_keys}"
        )
    embedding_key = embedding_keys[0]
    old_embeddings = state[embedding_key]
    old_rows = old_embeddings.shape[0]
    if max(old_vocab.values()) >= old_rows:
        raise DataError(
            f"{checkpoint_dir}: old vocabulary has id {max(old_vocab.values())} but {embedding_key} has "
            f"{old_rows} rows; expected the checkpoint's own vocabulary"
        )

    new_size = max(new_vocab.values()) + 1
    if pad_to_multiple_of:
        new_size = int(math.ceil(new_size / pad_to_multiple_of) * pad_to_multiple_of)
    new_ids, old_ids = [], []
    for token, new_id in new_vocab.items():
        if token in old_vocab and not reinit_all_rows:
            new_ids.append(new_id)
            old_ids.append(old_vocab[token])
    new_ids_t = torch.tensor(new_ids, dtype=torch.long)
    old_ids_t = torch.tensor(old_ids, dtype=torch.long)
    n_shared_genes = sum(1 for t in new_vocab if t in old_vocab and not is_special_token(t) and not reinit_all_rows)
    n_shared_special = len(new_ids) - n_shared_genes
    already_new = new_gene_rows(checkpoint_dir)  # a remapped checkpoint's own fresh rows stay fresh
    new_genes = sorted(t for t in new_vocab if not is_special_token(t)
                       and (reinit_all_rows or t not in old_vocab or t in already_new))
    n_new_vocab_genes = sum(1 for t in new_vocab if not is_special_token(t))
    n_dropped = sum(1 for t in old_vocab if not is_special_token(t) and t not in new_vocab)
    n_pretrained = n_new_vocab_genes - len(new_genes)
    counts = (f"{n_pretrained} of the new vocabulary's {n_new_vocab_genes} genes keep pretrained rows, "
              f"{len(new_genes)} are new (random rows, e.g. {new_genes[:3]}), {n_dropped} of the checkpoint's genes "
              "are dropped")
    low = n_pretrained == 0 or n_pretrained < min_gene_overlap * n_new_vocab_genes
    if low and not allow_low_gene_overlap and not reinit_all_rows:
        raise DataError(f"remap of {checkpoint_dir} onto {new_token_dictionary if not isinstance(new_token_dictionary, Mapping) else 'the new vocabulary'}: "
                        f"{counts}; {'none' if n_pretrained == 0 else f'fewer than {min_gene_overlap:.0%}'} shared: the model would know almost none of "
                        "these genes (do both vocabularies use the same gene ids, e.g. Ensembl?). Pass "
                        "--allow_low_gene_overlap to write it anyway")
    logger.warning("remap-vocab: %s", counts)

    generator = torch.Generator().manual_seed(seed)
    std = float(config.get("initializer_range", 0.02))

    if cellfm:  # CellFM's own initialisation of gene_emb: xavier-normal over (rows, dims)
        std = math.sqrt(2.0 / (new_size + old_embeddings.shape[1]))
    pad_id = new_vocab.get("<pad>", config.get("pad_token_id", 0)) if cellfm else None

    def remap_matrix(old: torch.Tensor) -> torch.Tensor:
        fresh = torch.randn((new_size, old.shape[1]), generator=generator, dtype=torch.float32) * std
        fresh = fresh.to(old.dtype)
        if pad_id is not None and pad_id < new_size:
            fresh[pad_id] = 0
        fresh[new_ids_t] = old[old_ids_t]
        return fresh

    def remap_vector(old: torch.Tensor) -> torch.Tensor:
        fresh = torch.zeros(new_size, dtype=old.dtype)
        fresh[new_ids_t] = old[old_ids_t]
        return fresh

    new_state = {}
    for key, tensor in state.items():
        if key == embedding_key:
            new_state[key] = remap_matrix(tensor)
        elif key.endswith(_VOCAB_BIASES) and tensor.shape[0] == old_rows:
            new_state[key] = remap_vector(tensor)
        elif key.endswith(_DECODER_WEIGHT) and tensor.shape[0] == old_rows:
            new_state[key] = None  # filled below, once the embeddings exist
        else:
            new_state[key] = tensor.clone()
    for key, tensor in state.items():
        if new_state[key] is None:
            tied = torch.equal(tensor, old_embeddings)
            new_state[key] = new_state[embedding_key].clone() if tied else remap_matrix(tensor)

    config["vocab_size"] = new_size
    with atomic_directory(output_dir, overwrite=True) as build:
        write_state_dict(new_state, build, safe_serialization=safe)
        write_json(build / "config.json", config, sort_keys=True)
        save_tokenizer_json(new_vocab, build)
        write_json(build / REMAP_RECORD, {"source_checkpoint": str(checkpoint_dir.resolve()),
                                          "n_genes": n_new_vocab_genes, "n_pretrained_genes": n_pretrained,
                                          "n_dropped_genes": n_dropped, "new_genes": new_genes})
    n_new_genes = sum(1 for t in new_vocab if not is_special_token(t))
    logger.info(
        "remapped %s -> %s: vocab %d -> %d rows; %d of %d genes shared with the checkpoint "
        "(%d special tokens copied), %d rows initialised N(0, %g)%s",
        checkpoint_dir, output_dir, old_rows, new_size, n_shared_genes, n_new_genes,
        n_shared_special, new_size - len(new_ids), std, " (every row: --reinit_all_rows)" if reinit_all_rows else "",
    )
    return n_shared_genes
