"""Gene vocabularies: Geneformer's dictionaries, ``tokenizer.json``, custom vocabularies.

- :func:`load_token_dictionary` / :func:`load_gene_median_dictionary` read plain JSON
  dictionaries (``token_dictionary.json``: ``{token: id}``, ``gene_median_dictionary.json``:
  ``{gene: median}``), Geneformer's pickles (with a restricted unpickler that runs no code from
  the file) and ``tokenizer.json``.
- :func:`save_tokenizer_json` writes a ``tokenizers`` WordLevel ``tokenizer.json``.
- :func:`build_vocabulary` builds both dictionaries from the user's own raw counts and
  :func:`write_dictionaries` saves them as JSON and as pickles.

Putting a checkpoint on another vocabulary is a model operation:
:func:`geneformer_peft.models.vocabulary.remap_checkpoint_vocabulary`.
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

from geneformer_peft.data.safe_pickle import load_plain_pickle
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
    "read_json_dictionary",
    "save_tokenizer_json",
    "build_vocabulary",
    "write_dictionaries",
    "tokenizer_dictionaries",
    "is_special_token",
    "validate_token_dictionary",
    "dictionary_digest",
]

PAD_TOKEN = "<pad>"
MASK_TOKEN = "<mask>"
CLS_TOKEN = "<cls>"
EOS_TOKEN = "<eos>"
UNK_TOKEN = "<unk>"
TOKENIZER_FILE = "tokenizer.json"
TOKEN_DICTIONARY_FILE = "token_dictionary.pkl"
GENE_MEDIAN_DICTIONARY_FILE = "gene_median_dictionary.pkl"
TOKEN_DICTIONARY_JSON_FILE = "token_dictionary.json"
GENE_MEDIAN_DICTIONARY_JSON_FILE = "gene_median_dictionary.json"

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
def validate_token_dictionary(raw: Any, source: str) -> dict[str, int]:
    """``raw`` as ``{token: int id}``, or a :class:`DataError` naming ``source`` and the bad entry."""
    if not isinstance(raw, Mapping):
        raise DataError(f"{source}: token dictionary is a {type(raw).__name__}; expected a dict of token -> id")
    result: dict[str, int] = {}
    for token, value in raw.items():
        if isinstance(value, (bool, np.bool_)):
            raise DataError(f"{source}: token {token!r} has id {value!r}; expected an integer")
        try:
            token_id = int(value)
        except (TypeError, ValueError, OverflowError) as exc:
            raise DataError(f"{source}: token {token!r} has id {value!r}; expected an integer") from exc
        if token_id < 0 or token_id != value:
            raise DataError(f"{source}: token {token!r} has id {value!r}; expected a non-negative integer")
        result[str(token)] = token_id
    if len(set(result.values())) != len(result):
        ids = np.array(list(result.values()))
        uniq, counts = np.unique(ids, return_counts=True)
        raise DataError(f"{source}: token ids {uniq[counts > 1][:5].tolist()} are used twice; expected unique ids")
    return result


def read_json_dictionary(path: PathLike, what: str) -> Any:
    """The JSON value in ``path``; a duplicated key or unreadable JSON is a :class:`DataError`.

    Parameters
    ----------
    path
        A ``.json`` file.
    what
        What the file should hold, for the messages (e.g. ``"a token dictionary {token: id}"``).
    """
    path = Path(path)

    def unique_keys(pairs: list[tuple[str, Any]]) -> dict:
        keys = [key for key, _ in pairs]
        if len(set(keys)) != len(keys):
            twice = sorted({key for key in keys if keys.count(key) > 1})
            raise DataError(f"{path}: keys {twice[:5]} appear twice; expected {what} with unique keys")
        return dict(pairs)

    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise DataError(f"{path}: not UTF-8 text ({error.reason} at byte {error.start}); expected {what} "
                        "as JSON") from error
    try:
        return json.loads(text, object_pairs_hook=unique_keys)
    except json.JSONDecodeError as error:
        raise DataError(f"{path}: not valid JSON ({error.msg} at line {error.lineno}, column {error.colno}); "
                        f"expected {what}") from error


def _is_tokenizers_json(raw: Any) -> bool:
    """Whether ``raw`` is a ``tokenizers`` tokenizer.json (they all have a ``model`` object)
    rather than a plain ``{token: id}`` dictionary (whose values are numbers)."""
    return isinstance(raw, dict) and isinstance(raw.get("model"), dict)


def dictionary_digest(token_dictionary: Mapping[str, int]) -> str:
    """SHA-256 of a token dictionary's content (token -> id, in id order): the same for its .pkl,
    .json and tokenizer.json forms; recorded by the tokenizer, compared by the compatibility report."""
    import hashlib
    import json

    items = sorted(((str(k), int(v)) for k, v in token_dictionary.items()), key=lambda kv: (kv[1], kv[0]))
    return hashlib.sha256(json.dumps(items, separators=(",", ":")).encode("utf-8")).hexdigest()


def load_token_dictionary(path: PathLike) -> dict[str, int]:
    """Load a token dictionary ``{token: id}``.

    Parameters
    ----------
    path
        A JSON object ``{token: id}`` (``token_dictionary.json``, as ``tokenize --build_vocab``
        writes), a ``tokenizer.json`` written by the ``tokenizers`` library, Geneformer's
        ``token_dictionary.pkl`` (``{"<pad>": 0, "<mask>": 1, ensembl_id: id}``; numpy integer
        ids are converted to ``int``; read without running code from the file), or a directory
        holding ``tokenizer.json``, ``token_dictionary.json`` or ``token_dictionary.pkl`` (the
        first found).

    Returns
    -------
    dict
        Token -> integer id.

    Raises
    ------
    DataError
        When the file is missing or unreadable, or an id is not a unique non-negative integer.
    """
    path = Path(path)
    if path.is_dir():
        candidates = [path / TOKENIZER_FILE, path / TOKEN_DICTIONARY_JSON_FILE, path / TOKEN_DICTIONARY_FILE]
        found = [c for c in candidates if c.is_file()]
        if not found:
            raise DataError(
                f"{path}: directory holds no token dictionary; looked for {[str(c) for c in candidates]}"
            )
        path = found[0]
    if not path.is_file():
        raise DataError(f"{path}: token dictionary file does not exist; expected a .json ({{token: id}} or "
                        "tokenizer.json) or a .pkl file")
    if path.suffix.lower() == ".json":
        raw = read_json_dictionary(path, "a token dictionary {token: id} or a tokenizers tokenizer.json")
        if not _is_tokenizers_json(raw):
            return validate_token_dictionary(raw, str(path))
        from tokenizers import Tokenizer

        try:
            vocab = Tokenizer.from_file(str(path)).get_vocab(with_added_tokens=True)
        except Exception as exc:  # tokenizers raises its own exception type
            raise DataError(f"{path}: not a readable tokenizers tokenizer.json ({exc})") from exc
        return validate_token_dictionary(dict(sorted(vocab.items(), key=lambda kv: kv[1])), str(path))
    return validate_token_dictionary(load_plain_pickle(path), str(path))


def load_gene_median_dictionary(path: PathLike) -> dict[str, float]:
    """Load a gene median dictionary as ``{ensembl_id: float}``.

    Parameters
    ----------
    path
        A JSON object ``{gene: median}`` (``gene_median_dictionary.json``, as ``tokenize
        --build_vocab`` writes), Geneformer's ``gene_median_dictionary.pkl`` (read without
        running code from the file), or a directory holding either (the JSON preferred).

    Raises
    ------
    DataError
        When the file is missing or unreadable, or a median is not a finite number > 0 (the
        message names the file, the gene and the value).
    """
    path = Path(path)
    if path.is_dir():
        json_path = path / GENE_MEDIAN_DICTIONARY_JSON_FILE
        path = json_path if json_path.is_file() else path / GENE_MEDIAN_DICTIONARY_FILE
    if not path.is_file():
        raise DataError(f"{path}: gene median dictionary file does not exist; expected a .json ({{gene: median}}) "
                        "or a .pkl file")
    if path.suffix.lower() == ".json":
        raw = read_json_dictionary(path, "a gene median dictionary {gene: median}")
    else:
        raw = load_plain_pickle(path)
    if not isinstance(raw, Mapping):
        raise DataError(f"{path}: gene median dictionary is a {type(raw).__name__}; expected a dict")
    result = {}
    for gene, value in raw.items():
        median = math.nan  # strings, booleans, None ... are refused, not converted
        if isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, (bool, np.bool_)):
            try:
                median = float(value)
            except OverflowError:  # an integer beyond float range
                pass
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

    vocab = validate_token_dictionary(token_dictionary, "token_dictionary")
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
    """Save both dictionaries as JSON (``token_dictionary.json``, ``gene_median_dictionary.json``),
    as Geneformer-style pickles (``token_dictionary.pkl``, ``gene_median_dictionary.pkl``) and
    as a ``tokenizer.json``.

    The JSON files hold the same dictionaries as the pickles and can be read without trusting
    the file; :func:`load_token_dictionary` and :func:`load_gene_median_dictionary` read both.

    Returns
    -------
    (token_dictionary_path, gene_median_dictionary_path)
        The pickles' paths (the JSON files lie beside them).
    """
    from geneformer_peft.files import write_json

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    token_path = directory / TOKEN_DICTIONARY_FILE
    median_path = directory / GENE_MEDIAN_DICTIONARY_FILE
    token_json, median_json = directory / TOKEN_DICTIONARY_JSON_FILE, directory / GENE_MEDIAN_DICTIONARY_JSON_FILE
    for path in (token_path, median_path, token_json, median_json):
        if path.exists() and not overwrite:
            raise DataError(f"{path}: file exists; expected a new path (pass overwrite=True to replace it)")
    tokens = {str(k): int(v) for k, v in token_dictionary.items()}
    medians = {str(k): float(v) for k, v in median_dictionary.items()}
    write_json(token_json, tokens, indent=0)
    write_json(median_json, medians, indent=0)
    with open(token_path, "wb") as handle:
        pickle.dump(tokens, handle)
    with open(median_path, "wb") as handle:
        pickle.dump(medians, handle)
    save_tokenizer_json(token_dictionary, directory)
    logger.info("wrote %s, %s and their .pkl forms in %s", token_json.name, median_json.name, directory)
    return token_path, median_path


def tokenizer_dictionaries(
    source: Any,
    *,
    token_dictionary: Any = None,
    gene_median_dictionary: Any = None,
    build_vocab: PathLike | None = None,
    overwrite: bool = False,
    gene_name_id_dictionary: Any = None,
    **build_options: Any,
) -> tuple[Any, Any]:
    """The two dictionaries a rank-value tokenization uses: both given, or built from ``source``.

    Parameters
    ----------
    source
        The raw counts (a path or an AnnData) the vocabulary is built from with ``build_vocab``.
    token_dictionary, gene_median_dictionary
        Dicts or paths; give both, or neither with ``build_vocab``.
    build_vocab
        A folder: build both dictionaries from ``source`` (:func:`build_vocabulary`) and write
        them there (:func:`write_dictionaries`).
    overwrite
        Replace dictionaries already in ``build_vocab``.
    gene_name_id_dictionary
        A symbol -> Ensembl map the tokenization will apply: refused with ``build_vocab`` (the
        vocabulary is then the file's own gene ids).
    **build_options
        Passed to :func:`build_vocabulary` (``gene_id_column``, ``model_version``, ...).

    Returns
    -------
    (token_dictionary, gene_median_dictionary)
        As given (paths or dicts), or the built dicts.
    """
    if build_vocab is not None:
        if token_dictionary is not None or gene_median_dictionary is not None:
            raise DataError("--build_vocab cannot be combined with --token_dictionary/--gene_median_dictionary")
        if gene_name_id_dictionary is not None:
            raise DataError("--build_vocab builds the vocabulary from the file's own gene ids; "
                            "--gene_name_id_dictionary maps symbols onto an Ensembl vocabulary "
                            "(--token_dictionary): give one or the other")
        tokens, medians = build_vocabulary(source, **build_options)
        write_dictionaries(build_vocab, tokens, medians, overwrite=overwrite)
        return tokens, medians
    if token_dictionary is None or gene_median_dictionary is None:
        raise DataError(
            "tokenize needs --token_dictionary and --gene_median_dictionary (or --build_vocab DIR); "
            f"got --token_dictionary={token_dictionary} --gene_median_dictionary={gene_median_dictionary}"
        )
    return token_dictionary, gene_median_dictionary
