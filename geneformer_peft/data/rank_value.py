"""Geneformer's rank value encoding of single-cell raw counts.

For cell c and gene g: ``x = counts / n_counts * 10,000 / median[g]`` (float64). Genes with
``x > 0`` are sorted by ``x`` descending, ties broken by token id (so the result does not
depend on column order), mapped to token ids and truncated to ``model_input_size``
(V2: ``<cls>`` + ``model_input_size - 2`` genes + ``<eos>``).

:func:`rank_value_encode` is the vectorised core over a block of cells;
:func:`tokenize_anndata` reads a file chunk by chunk and returns a ``datasets.Dataset``.
"""

from __future__ import annotations

import json
import logging
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import scipy.sparse as sp

from geneformer_peft.errors import DataError

logger = logging.getLogger(__name__)

__all__ = ["rank_value_encode", "tokenize_anndata", "TokenizationStats", "GeneMap", "build_gene_map"]

PathLike = str | Path
TARGET_SUM = 10_000.0
#: A gene name map leaving more than this share of the counts unmapped is reported at WARNING.


# ---------------------------------------------------------------------------------------------
# Core
# ---------------------------------------------------------------------------------------------
def rank_value_encode(
    counts: sp.spmatrix | np.ndarray,
    *,
    n_counts: np.ndarray,
    gene_token_ids: np.ndarray,
    gene_medians: np.ndarray,
    model_input_size: int = 2048,
    prefix_token_ids: Sequence[int] = (),
    suffix_token_ids: Sequence[int] = (),
    target_sum: float = TARGET_SUM,
) -> list[np.ndarray]:
    """Rank value encode a block of cells.

    Parameters
    ----------
    counts
        Cells x genes raw counts (scipy sparse or dense); columns are the genes of
        ``gene_token_ids`` / ``gene_medians``, without repeats.
    n_counts
        Total counts of each cell (over all genes of the original file), shape (cells,).
    gene_token_ids
        Token id of each column, shape (genes,).
    gene_medians
        Non-zero median of each column's gene, shape (genes,).
    model_input_size
        Maximum length of the output, special tokens included.
    prefix_token_ids, suffix_token_ids
        Tokens framing every cell (V2: ``[<cls>]`` and ``[<eos>]``).
    target_sum
        Normalisation total.

    Returns
    -------
    list of numpy.ndarray
        One int64 array of token ids per cell.
    """
    csr = sp.csr_matrix(counts, dtype=np.float64)
    n_rows = csr.shape[0]
    n_counts = np.asarray(n_counts, dtype=np.float64)
    gene_token_ids = np.asarray(gene_token_ids, dtype=np.int64)
    gene_medians = np.asarray(gene_medians, dtype=np.float64)
    limit = model_input_size - len(prefix_token_ids) - len(suffix_token_ids)
    if limit < 1:
        raise ValueError(
            f"model_input_size {model_input_size} leaves no room for genes after "
            f"{len(prefix_token_ids) + len(suffix_token_ids)} special tokens; expected a larger value"
        )
    rows = np.repeat(np.arange(n_rows), np.diff(csr.indptr))
    x = csr.data / n_counts[rows] * target_sum / gene_medians[csr.indices]
    positive = x > 0
    rows, x, tokens = rows[positive], x[positive], gene_token_ids[csr.indices[positive]]
    order = np.lexsort((tokens, -x, rows))  # by row, then x descending, then token id
    rows, tokens = rows[order], tokens[order]
    per_row = np.bincount(rows, minlength=n_rows)
    starts = np.concatenate([[0], np.cumsum(per_row)[:-1]]).astype(np.int64)
    rank = np.arange(len(rows)) - starts[rows]
    tokens = tokens[rank < limit]
    lengths = np.minimum(per_row, limit)
    pieces = np.split(tokens, np.cumsum(lengths)[:-1]) if n_rows else []
    if prefix_token_ids or suffix_token_ids:
        prefix = np.asarray(prefix_token_ids, dtype=np.int64)
        suffix = np.asarray(suffix_token_ids, dtype=np.int64)
        pieces = [np.concatenate([prefix, piece, suffix]) for piece in pieces]
    return pieces


# ---------------------------------------------------------------------------------------------
# Gene matching
# ---------------------------------------------------------------------------------------------
@dataclass
class GeneMap:
    """How the columns of a file map onto the vocabulary.

    ``columns`` are the file's matched columns; ``aggregate`` (matched columns x unique
    genes, or ``None`` when no gene id repeats) sums repeated gene ids.
    """

    columns: np.ndarray
    token_ids: np.ndarray
    medians: np.ndarray
    aggregate: sp.csr_matrix | None
    n_genes_total: int
    n_missing_token: int
    n_missing_median: int
    n_repeated: int

    def project(self, block: sp.csr_matrix) -> sp.csr_matrix:
        """Restrict a cells x all-genes block to matched genes (repeats summed)."""
        matched = block[:, self.columns]
        return matched @ self.aggregate if self.aggregate is not None else matched


def build_gene_map(
    gene_ids: np.ndarray,
    token_dictionary: Mapping[str, int],
    gene_median_dictionary: Mapping[str, float] | None,
    *,
    source_name: str,
) -> GeneMap:
    """Match a file's gene ids to the token and median dictionaries.

    ``gene_median_dictionary=None`` (an encoding without medians, e.g. CellFM's): genes are
    matched on the token dictionary alone, its special tokens (``<pad>``...) excluded, and every
    median reads 1.
    """
    if gene_median_dictionary is None:
        from geneformer_peft.data.vocab import is_special_token

        has_token = np.array([g in token_dictionary and not is_special_token(str(g)) for g in gene_ids], dtype=bool)
        has_median = np.ones(len(gene_ids), dtype=bool)
    else:
        has_token = np.array([g in token_dictionary for g in gene_ids], dtype=bool)
        has_median = np.array([g in gene_median_dictionary for g in gene_ids], dtype=bool)
    matched = has_token & has_median
    if not matched.any():
        if gene_median_dictionary is None:
            example = next((str(k) for k in token_dictionary if not str(k).startswith("<")), "?")
            where, expected = "token dictionary", f"ids of its kind such as {example!r}"
        else:
            where, expected = "token and median dictionaries", "Ensembl ids such as 'ENSG00000000003'"
        raise DataError(
            f"{source_name}: none of the {len(gene_ids)} gene ids (e.g. {[str(g) for g in gene_ids[:3]]}) is in the "
            f"{where}; expected {expected} (pick the right column with gene_id_column)"
        )
    columns = np.flatnonzero(matched)
    unique_genes, inverse = np.unique(gene_ids[columns], return_inverse=True)
    aggregate = None
    n_repeated = len(columns) - len(unique_genes)
    if n_repeated:
        logger.warning("%s: %d columns repeat a gene id; their counts are summed", source_name, n_repeated)
        aggregate = sp.csr_matrix(
            (np.ones(len(columns)), (np.arange(len(columns)), inverse)), shape=(len(columns), len(unique_genes))
        )
    else:
        order = np.argsort(inverse)
        columns = columns[order]
    if gene_median_dictionary is None:
        medians = np.ones(len(unique_genes), dtype=np.float64)
    else:
        medians = np.array([gene_median_dictionary[g] for g in unique_genes], dtype=np.float64)
    bad = ~(np.isfinite(medians) & (medians > 0))
    if bad.any():
        gene = str(unique_genes[np.flatnonzero(bad)[0]])
        raise DataError(
            f"gene_median_dictionary: gene {gene!r} has median {gene_median_dictionary[gene]!r}; "
            "expected a finite number > 0"
        )
    return GeneMap(
        columns=columns,
        token_ids=np.array([int(token_dictionary[g]) for g in unique_genes], dtype=np.int64),
        medians=medians,
        aggregate=aggregate,
        n_genes_total=len(gene_ids),
        n_missing_token=int((~has_token).sum()),
        n_missing_median=int((has_token & ~has_median).sum()),
        n_repeated=n_repeated,
    )


# ---------------------------------------------------------------------------------------------
# Files
# ---------------------------------------------------------------------------------------------
@dataclass
class TokenizationStats:
    """Summary of one tokenization run (also stored as JSON in ``dataset.info.description``)."""

    source: str
    model_version: str
    model_input_size: int
    n_cells_total: int
    n_cells_kept: int
    n_genes_total: int
    n_genes_matched: int
    n_genes_missing_token: int
    n_genes_missing_median: int
    matched_count_fraction: float
    n_cells_truncated: int
    n_cells_empty: int
    length_min: int
    length_median: float
    length_max: int
    columns: list[str] = field(default_factory=list)
    gene_name_mapping: dict[str, Any] | None = None
    #: which dictionary made the tokens (:func:`~geneformer_peft.data.vocab.dictionary_digest`)
    token_dictionary_sha256: str | None = None

    def to_json(self) -> str:
        """Return the stats as a JSON string."""
        return json.dumps(asdict(self), indent=2)


def tokenize_anndata(
    path_or_adata: Any,
    *,
    token_dictionary: Mapping[str, int] | PathLike,
    gene_median_dictionary: Mapping[str, float] | PathLike,
    gene_id_column: str | None = None,
    label_column: str | None = None,
    keep_columns: Sequence[str] = (),
    model_input_size: int = 2048,
    model_version: str = "V1",
    chunk_size: int = 512,
    filter_column: str | None = "filter_pass",
    obs_filter: Mapping[str, Any] | None = None,
    show_progress: bool = True,
    cache_dir: PathLike | None = None,
    return_stats: bool = False,
    gene_name_id_dictionary: Mapping[str, str] | PathLike | None = None,
    nproc: int = 1,
):
    """Tokenize a ``.h5ad`` / ``.loom`` file or an AnnData into a ``datasets.Dataset``.

    Parameters
    ----------
    path_or_adata
        ``.h5ad`` path (read in backed mode), ``.loom`` path (needs loompy) or AnnData.
    token_dictionary, gene_median_dictionary
        Dicts or paths (see :mod:`geneformer_peft.data.vocab`).
    gene_id_column
        ``var`` column of Ensembl ids (or of symbols, with ``gene_name_id_dictionary``);
        ``None``: ``var["ensembl_id"]`` when present, else ``var_names``. Genes missing from
        either dictionary are dropped (reported). Ids that are mostly not Ensembl ids against a
        vocabulary of Ensembl ids are refused (see
        :func:`~geneformer_peft.data.gene_ids.check_gene_id_kinds`).
    label_column
        ``obs`` column copied to the dataset under its own name (e.g. ``cell_type``).
    keep_columns
        Further ``obs`` columns to copy.
    model_input_size
        Maximum number of tokens per cell (2048 for V1, 4096 for V2).
    model_version
        ``"V1"`` or ``"V2"`` (adds ``<cls>`` first and ``<eos>`` last).
    chunk_size
        Cells read at a time (memory stays flat in the number of cells).
    filter_column
        Cells with ``obs[filter_column] != 1`` are skipped when the column exists.
    obs_filter
        ``{column: value or [values]}``: keep only matching cells (compared as strings).
    show_progress
        Show a tqdm progress bar.
    cache_dir
        Where the Arrow file backing the dataset is written; default: a temporary
        directory removed when the interpreter exits (call ``save_to_disk`` to keep it).
    return_stats
        Also return the :class:`TokenizationStats`.
    gene_name_id_dictionary
        Gene symbol -> Ensembl id (a dict, Geneformer's ``gene_name_id_dict.pkl`` or a
        two-column CSV/TSV; see :func:`~geneformer_peft.data.gene_ids.read_gene_name_map`):
        the file's symbols are translated before matching the vocabulary; ids already Ensembl
        pass through (without version suffix); columns that get the same Ensembl id are
        summed, as repeated gene ids always are. The figures go to
        ``TokenizationStats.gene_name_mapping``.
    nproc
        Worker processes: each reads its own ranges of chunks from the file, encodes them and
        writes them to a shard, which this process appends to the output in file order (each
        worker holds one chunk at a time; the chunks are those of ``nproc=1``, so the output is
        identical to it). Workers are forked where the platform allows it, else spawned (a
        script calling this then needs the ``if __name__ == "__main__":`` guard).

    Returns
    -------
    datasets.Dataset or (datasets.Dataset, TokenizationStats)
        Columns ``input_ids`` (list of int64), ``length`` (int64), then the label and kept
        columns. One row per kept cell, in file order.

    Raises
    ------
    DataError
        Missing file / column, 0 cells, no gene in the vocabulary, a matrix that is not
        raw counts, invalid ``n_counts``, V2 special tokens missing from the dictionary, gene
        symbols against an Ensembl vocabulary without ``gene_name_id_dictionary``, a bad map.
    """
    import pyarrow as pa

    from geneformer_peft.data.cell_source import (
        iter_cell_chunks,
        open_cell_source,
        read_obs_n_counts,
        select_cells,
    )
    from geneformer_peft.data.chunk_writer import ChunkWriter, list_column, output_columns
    from geneformer_peft.data.gene_ids import classify_vocabulary, load_gene_name_map, vocabulary_gene_ids
    from geneformer_peft.data.vocab import (
        CLS_TOKEN,
        EOS_TOKEN,
        check_model_version,
        dictionary_digest,
        load_gene_median_dictionary,
        load_token_dictionary,
    )

    check_model_version(model_version)
    if chunk_size < 1:
        raise DataError(f"chunk_size {chunk_size!r} is not valid; expected a positive integer")
    if isinstance(nproc, bool) or not isinstance(nproc, (int, np.integer)) or nproc < 1:
        raise DataError(f"nproc {nproc!r} is not valid; expected a positive integer (worker processes)")
    if not isinstance(token_dictionary, Mapping):
        token_dictionary = load_token_dictionary(token_dictionary)
    if not isinstance(gene_median_dictionary, Mapping):
        gene_median_dictionary = load_gene_median_dictionary(gene_median_dictionary)
    name_map = name_map_source = None
    if gene_name_id_dictionary is not None:
        name_map, name_map_source, _ = load_gene_name_map(gene_name_id_dictionary, token_dictionary)
        vocabulary = classify_vocabulary(token_dictionary)
        if vocabulary.n_ensembl == 0:  # the rank value encoding maps symbols to Ensembl ids only
            raise DataError(
                f"gene_name_id_dictionary {name_map_source}: maps gene symbols to Ensembl ids, but the token "
                f"dictionary holds none (e.g. {list(vocabulary.examples.get('symbol', ()))[:3]}); expected an "
                "Ensembl vocabulary such as Geneformer's, or no gene name map"
            )
    prefix: tuple[int, ...] = ()
    suffix: tuple[int, ...] = ()
    if model_version == "V2":
        missing = [t for t in (CLS_TOKEN, EOS_TOKEN) if t not in token_dictionary]
        if missing:
            raise DataError(
                f"token_dictionary: V2 needs special tokens {missing} which it does not hold; "
                "expected a V2 dictionary with '<cls>' and '<eos>'"
            )
        prefix, suffix = (int(token_dictionary[CLS_TOKEN]),), (int(token_dictionary[EOS_TOKEN]),)

    with open_cell_source(path_or_adata, gene_id_column=gene_id_column) as cells:
        out_columns = output_columns(cells, label_column, keep_columns, ("input_ids", "length"))
        keep = select_cells(cells.obs, source_name=cells.name, filter_column=filter_column, obs_filter=obs_filter)
        vocab_gene_ids, mapping = vocabulary_gene_ids(cells, token_dictionary, name_map)  # symbols -> Ensembl only
        column_counts = None if mapping is None else np.zeros(cells.n_genes, dtype=np.float64)
        gene_map = build_gene_map(vocab_gene_ids, token_dictionary, gene_median_dictionary, source_name=cells.name)
        output = ChunkWriter(cells, out_columns, [("input_ids", pa.list_(pa.int64())), ("length", pa.int64())],
                             cache_dir=cache_dir, temp_prefix="geneformer_peft_tokenize_", stem="tokenized")
        for column, array in output.obs_arrays.items():
            if array.null_count:
                logger.warning("%s: obs[%r] has %d missing values (kept as null)", cells.name, column, array.null_count)

        totals = _Totals()
        with output as writer:
            if nproc == 1:
                for chunk in iter_cell_chunks(cells, keep, chunk_size=chunk_size, desc="tokenizing",
                                              show_progress=show_progress):
                    part = _encode_chunk(chunk, gene_map, source_name=cells.name, model_input_size=model_input_size,
                                         prefix=prefix, suffix=suffix, count_columns=column_counts is not None)
                    totals.add(part)
                    writer.write(_token_arrays(part), part.rows)
            else:
                job = _TokenizeJob(cells=cells.detached(), keep=keep, chunk_size=chunk_size, gene_map=gene_map,
                                   schema=writer.schema, obs_arrays=writer.obs_arrays,
                                   work_dir=str(Path(writer.path).parent),
                                   encode_options=dict(model_input_size=model_input_size, prefix=prefix,
                                                       suffix=suffix, count_columns=column_counts is not None))
                read_obs_n_counts(cells)  # says once where n_counts comes from (the workers say it at DEBUG)
                cells.close()  # each worker opens the file itself; none inherits this process's handle
                _tokenize_in_workers(job, nproc=nproc, writer=writer, totals=totals, show_progress=show_progress)
        if column_counts is not None:
            column_counts += totals.column_counts
        lengths_parts, total_counts, matched_counts, n_truncated = (
            totals.lengths, totals.raw_total, totals.matched_total, totals.n_truncated)

    lengths = np.concatenate(lengths_parts)
    gene_only_lengths = lengths - len(prefix) - len(suffix)
    stats = TokenizationStats(
        source=cells.name,
        model_version=model_version,
        model_input_size=model_input_size,
        n_cells_total=cells.n_cells,
        n_cells_kept=int(len(lengths)),
        n_genes_total=gene_map.n_genes_total,
        n_genes_matched=int(len(gene_map.token_ids)),
        n_genes_missing_token=gene_map.n_missing_token,
        n_genes_missing_median=gene_map.n_missing_median,
        matched_count_fraction=float(matched_counts / total_counts) if total_counts else 0.0,
        n_cells_truncated=n_truncated,
        n_cells_empty=int((gene_only_lengths == 0).sum()),
        length_min=int(lengths.min()),
        length_median=float(np.median(lengths)),
        length_max=int(lengths.max()),
        columns=["input_ids", "length"] + out_columns,
        gene_name_mapping=(None if mapping is None
                           else mapping.summary(cells.gene_ids, column_counts, source=name_map_source)),
        token_dictionary_sha256=dictionary_digest(token_dictionary),
    )
    _log_stats(stats)
    dataset = output.dataset(stats.to_json())
    return (dataset, stats) if return_stats else dataset


@dataclass
class _EncodedChunk:
    """One chunk's tokens and counters."""

    rows: np.ndarray
    lengths: np.ndarray
    flat: np.ndarray
    n_truncated: int
    raw_total: float
    matched_total: float
    column_counts: np.ndarray | None = None  # per file gene, for the symbol map's report


def _encode_chunk(chunk: Any, gene_map: GeneMap, *, source_name: str, model_input_size: int,
                  prefix: tuple[int, ...], suffix: tuple[int, ...], count_columns: bool = False) -> _EncodedChunk:
    """Check ``n_counts`` and rank value encode one :class:`~geneformer_peft.data.cell_source.CellChunk`."""
    n_counts = chunk.n_counts
    matched = gene_map.project(chunk.counts)
    has_counts = np.diff(matched.indptr) > 0
    invalid = has_counts & ~(np.isfinite(n_counts) & (n_counts > 0))
    if invalid.any():
        row = int(np.flatnonzero(invalid)[0])
        raise DataError(
            f"{source_name}: field obs['n_counts'] is {float(n_counts[row])!r} for cell "
            f"{str(chunk.cell_names[row])!r}; expected a positive total count"
        )
    encoded = rank_value_encode(
        matched,
        n_counts=n_counts,
        gene_token_ids=gene_map.token_ids,
        gene_medians=gene_map.medians,
        model_input_size=model_input_size,
        prefix_token_ids=prefix,
        suffix_token_ids=suffix,
    )
    return _EncodedChunk(
        rows=chunk.rows,
        lengths=np.array([len(e) for e in encoded], dtype=np.int64),
        flat=np.concatenate(encoded) if encoded else np.zeros(0, dtype=np.int64),
        n_truncated=int((np.diff(matched.indptr) > model_input_size - len(prefix) - len(suffix)).sum()),
        raw_total=float(chunk.raw_totals.sum()),
        matched_total=float(matched.sum()),
        column_counts=np.asarray(chunk.counts.sum(axis=0)).ravel() if count_columns else None,
    )


def _token_arrays(part: _EncodedChunk) -> list[Any]:
    """One chunk's token columns (``input_ids``, ``length``) as Arrow arrays."""
    import pyarrow as pa

    from geneformer_peft.data.chunk_writer import list_column

    return [list_column(part.lengths, part.flat, pa.int64()), pa.array(part.lengths)]


@dataclass
class _Totals:
    """The counters of :class:`TokenizationStats` summed over chunks (counts are integers, so
    the sums do not depend on the order of addition)."""

    lengths: list[np.ndarray] = field(default_factory=list)
    raw_total: float = 0.0
    matched_total: float = 0.0
    n_truncated: int = 0
    column_counts: Any = 0.0

    def add(self, part: _EncodedChunk | _Totals) -> None:
        is_chunk = isinstance(part, _EncodedChunk)
        self.lengths.extend([part.lengths] if is_chunk else part.lengths)
        self.raw_total += part.raw_total
        self.matched_total += part.matched_total
        self.n_truncated += part.n_truncated
        if part.column_counts is not None:
            self.column_counts = self.column_counts + part.column_counts


@dataclass
class _TokenizeJob:
    """What every tokenization worker needs: set once per worker (inherited when forked)."""

    cells: Any  # a detached CellSource
    keep: np.ndarray
    chunk_size: int
    gene_map: GeneMap
    schema: Any
    obs_arrays: dict[str, Any]
    work_dir: str
    encode_options: dict[str, Any]
    run_id: str = field(default_factory=lambda: uuid.uuid4().hex)

    def shard_path(self, index: int) -> Path:
        return Path(self.work_dir) / f"shard-{self.run_id}-{index:06d}.arrow"


_WORKER: dict[str, _TokenizeJob] = {}


def _start_worker(job: _TokenizeJob) -> None:
    _WORKER["job"] = job
    _keep_freed_memory()


def _keep_freed_memory() -> None:
    """In a worker process (glibc only): keep freed blocks up to 32 MiB for reuse.

    By default glibc hands large freed blocks back to the system at once, and a worker frees
    and asks again for the same few chunk-sized arrays at every chunk: the page faults cost
    about 8% of its CPU time. Kept, they are reused; the worker's memory stays bounded by one
    chunk's working set. Only this library's own worker processes are changed.
    """
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.mallopt(-1, 32 << 20)  # M_TRIM_THRESHOLD
        libc.mallopt(-3, 32 << 20)  # M_MMAP_THRESHOLD (glibc's maximum on 64-bit)
    except (OSError, AttributeError):  # not glibc: its allocator as it is
        pass


def _tokenize_segment(index: int, starts: list[int]) -> _Totals:
    """Worker: read, check and encode the chunks at ``starts`` and write them to shard ``index``."""
    import pyarrow as pa

    from geneformer_peft.data.cell_source import iter_cell_chunks
    from geneformer_peft.data.chunk_writer import record_batch

    job = _WORKER["job"]
    totals = _Totals()
    with pa.OSFile(str(job.shard_path(index)), "wb") as sink, pa.ipc.new_stream(sink, job.schema) as writer:
        for chunk in iter_cell_chunks(job.cells, job.keep, chunk_size=job.chunk_size, starts=starts,
                                      show_progress=False):
            part = _encode_chunk(chunk, job.gene_map, source_name=job.cells.name, **job.encode_options)
            totals.add(part)
            writer.write_batch(record_batch(job.schema, job.obs_arrays, _token_arrays(part), part.rows))
    return totals


def _worker_context():
    """``fork`` where the platform has it (workers start in milliseconds and inherit the job
    without copying it), else ``spawn`` (the job is pickled to each worker once; workers
    re-import ``__main__``: scripts need the ``if __name__ == "__main__":`` guard)."""
    import multiprocessing

    method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
    return multiprocessing.get_context(method)


#: Chunks per worker task at most: bounds the shards waiting on disk to be joined
SEGMENT_CHUNKS = 16


def _segments(starts: list[int], nproc: int) -> list[list[int]]:
    """Consecutive runs of chunk starts, at least 4 per worker where there are enough chunks
    (so a slow worker delays the end little), at most :data:`SEGMENT_CHUNKS` chunks each."""
    size = max(1, min(SEGMENT_CHUNKS, -(-len(starts) // (4 * nproc))))
    return [starts[i:i + size] for i in range(0, len(starts), size)]


def _tokenize_in_workers(job: _TokenizeJob, *, nproc: int, writer: Any, totals: _Totals,
                         show_progress: bool) -> None:
    """Tokenize ``job`` in ``nproc`` worker processes into ``writer`` (the output's
    :class:`~geneformer_peft.data.chunk_writer.ChunkWriter`), adding to ``totals``.

    Each worker reads its own row ranges of the file (consecutive chunks, the same chunks as
    one process reads), encodes them and writes an Arrow shard; this process only assigns the
    ranges and appends the shards to the output in file order, deleting each once appended.
    No counts travel between processes. Each worker holds one chunk at a time; at most
    ``2 * nproc`` ranges are assigned ahead of the output, so at most that many shards wait on
    disk. A worker's error is raised here for the first failing chunk in file order, as in
    one process.
    """
    import itertools
    from collections import deque
    from concurrent.futures import ProcessPoolExecutor
    from concurrent.futures.process import BrokenProcessPool

    import pyarrow as pa
    from tqdm.auto import tqdm

    from geneformer_peft.data.cell_source import chunk_starts

    segments = _segments(chunk_starts(job.keep, job.chunk_size), nproc)
    context = _worker_context()
    logger.info("%s: tokenizing %d ranges of chunks in %d worker processes (%s)", job.cells.name, len(segments),
                nproc, context.get_start_method())
    executor = ProcessPoolExecutor(max_workers=nproc, mp_context=context, initializer=_start_worker,
                                   initargs=(job,))
    try:
        # at most 2 * nproc ranges submitted and not yet appended: bounds the shards on disk
        unassigned = enumerate(segments)
        futures = deque(executor.submit(_tokenize_segment, i, segment)
                        for i, segment in itertools.islice(unassigned, 2 * nproc))
        progress = tqdm(total=sum(map(len, segments)), desc=f"tokenizing {Path(job.cells.name).name}",
                        disable=not show_progress)
        with progress:
            for index, segment in enumerate(segments):
                try:
                    totals.add(futures.popleft().result())
                except BrokenProcessPool as error:  # a worker killed from outside (the OOM killer, a signal)
                    raise DataError(f"{job.cells.name}: a tokenization worker process died while reading chunks "
                                    f"({error}); nothing was written. Rerun with a lower --nproc or --chunk_size "
                                    "if the machine ran out of memory") from None
                for following, next_segment in itertools.islice(unassigned, 1):
                    futures.append(executor.submit(_tokenize_segment, following, next_segment))
                shard = job.shard_path(index)
                with pa.memory_map(str(shard)) as source:
                    for batch in pa.ipc.open_stream(source):
                        writer.write_batch(batch)
                shard.unlink()
                progress.update(len(segment))
    finally:
        executor.shutdown(wait=True, cancel_futures=True)
        for index in range(len(segments)):
            job.shard_path(index).unlink(missing_ok=True)


def _log_stats(stats: TokenizationStats) -> None:
    logger.info(
        "%s: kept %d of %d cells; %d of %d genes matched the vocabulary (%d without token, %d without "
        "median) holding %.1f%% of counts; length min/median/max %d/%.0f/%d; %d cells truncated to %d",
        stats.source, stats.n_cells_kept, stats.n_cells_total, stats.n_genes_matched, stats.n_genes_total,
        stats.n_genes_missing_token, stats.n_genes_missing_median, 100 * stats.matched_count_fraction,
        stats.length_min, stats.length_median, stats.length_max, stats.n_cells_truncated, stats.model_input_size,
    )
    if stats.gene_name_mapping is not None:
        from geneformer_peft.data.gene_ids import log_gene_name_mapping

        log_gene_name_mapping(stats.source, stats.gene_name_mapping)
    if stats.n_cells_empty:
        logger.warning(
            "%s: %d cells have no count in any vocabulary gene; they are kept with no gene token",
            stats.source, stats.n_cells_empty,
        )
