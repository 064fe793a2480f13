"""Gene vocabularies: Geneformer's dictionaries, ``tokenizer.json``, custom vocabularies.

- :func:`load_token_dictionary` / :func:`load_gene_median_dictionary` read Geneformer's
  pickles (and ``tokenizer.json``).
- :func:`save_tokenizer_json` writes a ``tokenizers`` WordLevel ``tokenizer.json``.
- :func:`build_vocabulary` builds both dictionaries from the user's own raw counts and
  :func:`write_dictionaries` saves them as pickles.
- :func:`remap_checkpoint_vocabulary` adapts a pretrained checkpoint's word embeddings to a
  new vocabulary (rows of shared genes copied, the rest initialised fresh).
"""

from __future__ import annotations

import json
import logging
import math
import pickle
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from geneformer_peft.errors import DataError

logger = logging.getLogger(__name__)

__all__ = [
    "MODEL_VERSIONS",
    "check_model_version",
    "PAD_TOKEN",
    "MASK_TOKEN",
    "CLS_TOKEN",
    "EOS_TOKEN",
    "load_token_dictionary",
    "load_gene_median_dictionary",
    "save_tokenizer_json",
    "build_vocabulary",
    "write_dictionaries",
    "remap_checkpoint_vocabulary",
    "is_special_token",
]

PAD_TOKEN = "<pad>"
MASK_TOKEN = "<mask>"
CLS_TOKEN = "<cls>"
EOS_TOKEN = "<eos>"
UNK_TOKEN = "<unk>"
TOKENIZER_FILE = "tokenizer.json"
TOKEN_DICTIONARY_FILE = "token_dictionary.pkl"
GENE_MEDIAN_DICTIONARY_FILE = "gene_median_dictionary.pkl"

PathLike = str | Path


MODEL_VERSIONS = ("V1", "V2")


def check_model_version(model_version: str) -> None:
    """Raise :class:`DataError` unless ``model_version`` is ``"V1"`` or ``"V2"``.

    V1 inputs are genes only; V2 inputs start with ``<cls>`` and end with ``<eos>``, and
    V2 vocabularies hold those two tokens.
    """
    if model_version not in MODEL_VERSIONS:
        raise DataError(f"model_version {model_version!r} is not supported; expected one of {list(MODEL_VERSIONS)}")


def is_special_token(token: str) -> bool:
    """Return whether ``token`` is a special token such as ``<pad>`` (not a gene)."""
    return token.startswith("<") and token.endswith(">")


# ---------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------
def _validate_token_dictionary(raw: Any, source: str) -> dict[str, int]:
    if not isinstance(raw, Mapping):
        raise DataError(f"{source}: token dictionary is a {type(raw).__name__}; expected a dict of token -> id")
    result: dict[str, int] = {}
    for token, value in raw.items():
        try:
            token_id = int(value)
        except (TypeError, ValueError) as exc:
            raise DataError(f"{source}: token {token!r} has id {value!r}; expected an integer") from exc
        if token_id < 0 or token_id != value:
            raise DataError(f"{source}: token {token!r} has id {value!r}; expected a non-negative integer")
        result[str(token)] = token_id
    if len(set(result.values())) != len(result):
        ids = np.array(list(result.values()))
        uniq, counts = np.unique(ids, return_counts=True)
        raise DataError(f"{source}: token ids {uniq[counts > 1][:5].tolist()} are used twice; expected unique ids")
    return result


def load_token_dictionary(path: PathLike) -> dict[str, int]:
    """Load a token dictionary ``{token: id}``.

    Parameters
    ----------
    path
        Geneformer's ``token_dictionary.pkl`` (``{"<pad>": 0, "<mask>": 1, ensembl_id: id}``;
        numpy integer ids are converted to ``int``), a ``tokenizer.json`` written by the
        ``tokenizers`` library, or a directory holding ``tokenizer.json`` (or
        ``token_dictionary.pkl``).

    Returns
    -------
    dict
        Token -> integer id.
    """
    path = Path(path)
    if path.is_dir():
        candidates = [path / TOKENIZER_FILE, path / TOKEN_DICTIONARY_FILE]
        found = [c for c in candidates if c.is_file()]
        if not found:
            raise DataError(
                f"{path}: directory holds no token dictionary; looked for {[str(c) for c in candidates]}"
            )
        path = found[0]
    if not path.is_file():
        raise DataError(f"{path}: token dictionary file does not exist; expected a .pkl or tokenizer.json")
    if path.suffix.lower() == ".json":
        from tokenizers import Tokenizer

        try:
            vocab = Tokenizer.from_file(str(path)).get_vocab(with_added_tokens=True)
        except Exception as exc:  # tokenizers raises its own exception type
            raise DataError(f"{path}: not a readable tokenizers tokenizer.json ({exc})") from exc
        return _validate_token_dictionary(dict(sorted(vocab.items(), key=lambda kv: kv[1])), str(path))
    with open(path, "rb") as handle:
        raw = pickle.load(handle)
    return _validate_token_dictionary(raw, str(path))


def load_gene_median_dictionary(path: PathLike) -> dict[str, float]:
    """Load Geneformer's ``gene_median_dictionary.pkl`` as ``{ensembl_id: float}``.

    Raises
    ------
    DataError
        When a median is not a finite positive number.
    """
    path = Path(path)
    if path.is_dir():
        path = path / GENE_MEDIAN_DICTIONARY_FILE
    if not path.is_file():
        raise DataError(f"{path}: gene median dictionary file does not exist; expected a .pkl file")
    with open(path, "rb") as handle:
        raw = pickle.load(handle)
    if not isinstance(raw, Mapping):
        raise DataError(f"{path}: gene median dictionary is a {type(raw).__name__}; expected a dict")
    result = {}
    for gene, value in raw.items():
        median = float(value)
        if not (math.isfinite(median) and median > 0):
            raise DataError(f"{path}: gene {gene!r} has median {value!r}; expected a finite number > 0")
        result[str(gene)] = median
    return result


# ---------------------------------------------------------------------------------------------
# tokenizer.json
# ---------------------------------------------------------------------------------------------
def save_tokenizer_json(token_dictionary: Mapping[str, int], directory: PathLike) -> Path:
    """Write ``token_dictionary`` as a ``tokenizers`` WordLevel ``tokenizer.json``.

    Tokens of the form ``<...>`` (``<pad>``, ``<mask>``, ``<cls>``, ``<eos>``, ...) are
    registered as special tokens. Gene ids are split on whitespace. An unknown gene id is
    an error when encoding (there is no ``<unk>`` in Geneformer's vocabularies: unknown
    genes must be dropped before encoding); if the dictionary holds ``<unk>`` it is used.

    Parameters
    ----------
    token_dictionary
        Token -> id.
    directory
        Output directory (created when missing).

    Returns
    -------
    pathlib.Path
        Path of the written file; :func:`load_token_dictionary` returns the same dict.
    """
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = _validate_token_dictionary(token_dictionary, "token_dictionary")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    unk = UNK_TOKEN if UNK_TOKEN in vocab else None
    tokenizer = Tokenizer(models.WordLevel(vocab=vocab, unk_token=unk))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    specials = [t for t in sorted(vocab, key=vocab.get) if is_special_token(t)]
    tokenizer.add_special_tokens(specials)
    if PAD_TOKEN in vocab:
        tokenizer.enable_padding(pad_id=vocab[PAD_TOKEN], pad_token=PAD_TOKEN)
    path = directory / TOKENIZER_FILE
    tokenizer.save(str(path))
    logger.info("wrote %s (%d tokens, special: %s)", path, len(vocab), specials)
    return path


# ---------------------------------------------------------------------------------------------
# Custom vocabulary
# ---------------------------------------------------------------------------------------------
def build_vocabulary(
    adata_or_paths: Any,
    *,
    gene_id_column: str | None = None,
    model_version: str = "V1",
    chunk_size: int = 512,
    filter_column: str | None = "filter_pass",
    obs_filter: Mapping[str, Any] | None = None,
    target_sum: float = 10_000.0,
    show_progress: bool = True,
) -> tuple[dict[str, int], dict[str, float]]:
    """Build a token dictionary and a gene median dictionary from the user's raw counts.

    The median of gene g is the median over cells with non-zero counts of
    ``counts / n_counts * target_sum`` (``n_counts`` from ``obs["n_counts"]`` when present,
    else the cell's total over all genes), computed exactly. Files are read chunk by chunk;
    the non-zero normalised values are kept (memory grows with the number of non-zero
    entries, 12 bytes each). Genes never detected get no token (their count is logged).

    Parameters
    ----------
    adata_or_paths
        An ``AnnData``, a path to ``.h5ad``/``.loom``, or a list of those (medians are
        taken over the cells of all of them).
    gene_id_column
        See :class:`geneformer_peft.data.cell_source.CellSource`.
    model_version
        ``"V1"``: ``<pad>`` 0, ``<mask>`` 1, then genes in lexicographic order.
        ``"V2"``: adds ``<cls>`` 2 and ``<eos>`` 3 before the genes.
    chunk_size
        Cells read at a time.
    filter_column, obs_filter
        Cell filters, see :func:`geneformer_peft.data.cell_source.select_cells`.
    target_sum
        Normalisation total (10,000 in Geneformer).
    show_progress
        Show a tqdm progress bar.

    Returns
    -------
    (token_dictionary, gene_median_dictionary)
    """
    from geneformer_peft.data.cell_source import (
        iter_cell_chunks,
        open_cell_source,
        select_cells,
    )

    check_model_version(model_version)
    sources = list(adata_or_paths) if isinstance(adata_or_paths, (list, tuple)) else [adata_or_paths]
    gene_index: dict[str, int] = {}
    all_genes: list = []
    gene_parts, value_parts = [], []
    n_cells_used = 0
    for source in sources:
        with open_cell_source(source, gene_id_column=gene_id_column) as cells:
            keep = select_cells(cells.obs, source_name=cells.name, filter_column=filter_column, obs_filter=obs_filter)
            for gene in cells.gene_ids:
                if gene not in gene_index:
                    gene_index[gene] = len(all_genes)
                    all_genes.append(gene)
            column_to_gene = np.array([gene_index[g] for g in cells.gene_ids], dtype=np.int64)
            for chunk in iter_cell_chunks(cells, keep, chunk_size=chunk_size, desc="medians",
                                          show_progress=show_progress):
                block, totals = chunk.counts, chunk.n_counts
                n_cells_used += block.shape[0]
                block.sum_duplicates()
                coo = block.tocoo()
                # duplicated gene ids within a file are summed per cell
                genes = column_to_gene[coo.col]
                key = coo.row.astype(np.int64) * len(all_genes) + genes
                uniq, inverse = np.unique(key, return_inverse=True)
                summed = np.bincount(inverse, weights=coo.data)
                rows, genes = uniq // len(all_genes), uniq % len(all_genes)
                values = summed / totals[rows] * target_sum
                positive = values > 0
                gene_parts.append(genes[positive].astype(np.int32))
                value_parts.append(values[positive])
    genes = np.concatenate(gene_parts) if gene_parts else np.zeros(0, dtype=np.int32)
    values = np.concatenate(value_parts) if value_parts else np.zeros(0)
    medians = _segment_medians(genes, values, len(all_genes))
    detected = np.flatnonzero(~np.isnan(medians))
    n_undetected = len(all_genes) - len(detected)
    if len(detected) == 0:
        raise DataError(f"{[str(s) for s in sources]}: no gene has a non-zero count; expected raw counts")
    if n_undetected:
        logger.warning("%d of %d genes have no count in any cell and get no token", n_undetected, len(all_genes))
    specials = [PAD_TOKEN, MASK_TOKEN] + ([CLS_TOKEN, EOS_TOKEN] if model_version == "V2" else [])
    token_dictionary = {token: i for i, token in enumerate(specials)}
    median_dictionary: dict[str, float] = {}
    for gene in sorted(all_genes[i] for i in detected):
        token_dictionary[gene] = len(token_dictionary)
        median_dictionary[gene] = float(medians[gene_index[gene]])
    logger.info(
        "built vocabulary: %d genes (+%d special tokens) from %d cells", len(median_dictionary), len(specials), n_cells_used
    )
    return token_dictionary, median_dictionary


def _segment_medians(groups: np.ndarray, values: np.ndarray, n_groups: int) -> np.ndarray:
    """Median of ``values`` per group id (NaN for empty groups), as ``np.median`` computes it."""
    order = np.lexsort((values, groups))
    groups, values = groups[order], values[order]
    counts = np.bincount(groups, minlength=n_groups)
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    medians = np.full(n_groups, np.nan)
    present = counts > 0
    lo = starts[present] + (counts[present] - 1) // 2
    hi = starts[present] + counts[present] // 2
    medians[present] = (values[lo] + values[hi]) / 2.0
    return medians


def write_dictionaries(
    directory: PathLike,
    token_dictionary: Mapping[str, int],
    median_dictionary: Mapping[str, float],
    *,
    overwrite: bool = False,
) -> tuple[Path, Path]:
    """Save both dictionaries as Geneformer-style pickles (and a ``tokenizer.json``).

    Returns
    -------
    (token_dictionary_path, gene_median_dictionary_path)
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    token_path = directory / TOKEN_DICTIONARY_FILE
    median_path = directory / GENE_MEDIAN_DICTIONARY_FILE
    for path in (token_path, median_path):
        if path.exists() and not overwrite:
            raise DataError(f"{path}: file exists; expected a new path (pass overwrite=True to replace it)")
    with open(token_path, "wb") as handle:
        pickle.dump({str(k): int(v) for k, v in token_dictionary.items()}, handle)
    with open(median_path, "wb") as handle:
        pickle.dump({str(k): float(v) for k, v in median_dictionary.items()}, handle)
    save_tokenizer_json(token_dictionary, directory)
    logger.info("wrote %s and %s", token_path, median_path)
    return token_path, median_path


# ---------------------------------------------------------------------------------------------
# Checkpoint vocabulary remapping
# ---------------------------------------------------------------------------------------------
_EMBEDDING_SUFFIX = "embeddings.word_embeddings.weight"
_DECODER_WEIGHT = "cls.predictions.decoder.weight"
_VOCAB_BIASES = ("cls.predictions.bias", "cls.predictions.decoder.bias")


def _load_checkpoint_weights(checkpoint_dir: Path) -> tuple[dict[str, Any], str]:
    import torch

    safetensors_path = checkpoint_dir / "model.safetensors"
    bin_path = checkpoint_dir / "pytorch_model.bin"
    if safetensors_path.is_file():
        from safetensors.torch import load_file

        return load_file(str(safetensors_path)), safetensors_path.name
    if bin_path.is_file():
        return torch.load(bin_path, map_location="cpu", weights_only=True), bin_path.name
    raise DataError(
        f"{checkpoint_dir}: no checkpoint weights; looked for {[str(safetensors_path), str(bin_path)]}"
    )


def remap_checkpoint_vocabulary(
    checkpoint_dir: PathLike,
    new_token_dictionary: Mapping[str, int] | PathLike,
    output_dir: PathLike,
    *,
    old_token_dictionary: Mapping[str, int] | PathLike | None = None,
    pad_to_multiple_of: int | None = 8,
    seed: int = 0,
) -> int:
    """Write a copy of a checkpoint whose word embeddings follow a new vocabulary.

    Works on the files (``config.json`` and ``model.safetensors`` or ``pytorch_model.bin``,
    safetensors preferred); no model class is imported. The new embedding matrix has
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

    Returns
    -------
    int
        Number of genes (non-special tokens) shared by both vocabularies.
    """
    import torch

    checkpoint_dir, output_dir = Path(checkpoint_dir), Path(output_dir)
    config_path = checkpoint_dir / "config.json"
    if not config_path.is_file():
        raise DataError(f"{checkpoint_dir}: checkpoint has no config.json; looked for {config_path}")
    config = json.loads(config_path.read_text())
    new_vocab = (
        _validate_token_dictionary(new_token_dictionary, "new_token_dictionary")
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
    elif isinstance(old_token_dictionary, Mapping):
        old_vocab = _validate_token_dictionary(old_token_dictionary, "old_token_dictionary")
    else:
        old_vocab = load_token_dictionary(old_token_dictionary)

    state, weights_name = _load_checkpoint_weights(checkpoint_dir)
    embedding_keys = [k for k in state if k.endswith(_EMBEDDING_SUFFIX)]
    if len(embedding_keys) != 1:
        raise DataError(
            f"{checkpoint_dir / weights_name}: expected exactly one '*{_EMBEDDING_SUFFIX}' tensor, "
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
        if token in old_vocab:
            new_ids.append(new_id)
            old_ids.append(old_vocab[token])
    new_ids_t = torch.tensor(new_ids, dtype=torch.long)
    old_ids_t = torch.tensor(old_ids, dtype=torch.long)
    n_shared_genes = sum(1 for t in new_vocab if t in old_vocab and not is_special_token(t))
    n_shared_special = len(new_ids) - n_shared_genes

    generator = torch.Generator().manual_seed(seed)
    std = float(config.get("initializer_range", 0.02))

    def remap_matrix(old: torch.Tensor) -> torch.Tensor:
        fresh = torch.randn((new_size, old.shape[1]), generator=generator, dtype=torch.float32) * std
        fresh = fresh.to(old.dtype)
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

    output_dir.mkdir(parents=True, exist_ok=True)
    config["vocab_size"] = new_size
    (output_dir / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    if weights_name.endswith(".safetensors"):
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in new_state.items()}, str(output_dir / weights_name), metadata={"format": "pt"})
    else:
        torch.save(new_state, output_dir / weights_name)
    save_tokenizer_json(new_vocab, output_dir)
    n_new_genes = sum(1 for t in new_vocab if not is_special_token(t))
    logger.info(
        "remapped %s -> %s: vocab %d -> %d rows; %d of %d genes shared with the checkpoint "
        "(%d special tokens copied), %d rows initialised N(0, %g)",
        checkpoint_dir, output_dir, old_rows, new_size, n_shared_genes, n_new_genes,
        n_shared_special, new_size - len(new_ids), std,
    )
    return n_shared_genes
