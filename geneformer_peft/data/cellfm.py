"""CellFM's encoding of single-cell raw counts: expressed genes with their log1p values.

Per cell (as CellFM's tutorials preprocess):

1. ``x = count * target_sum / total`` with ``total`` the cell's count over **all** genes of the
   file (``normalize_total(target_sum=1e4)`` before any gene is dropped); a gene id the file
   repeats has its columns summed;
2. ``value = log1p(x)``;
3. only expressed genes of the vocabulary (``count > 0``) become tokens, their ids the gene's
   row in the vocabulary (``<pad>`` = 0 and other ``<...>`` tokens are never genes);
4. at most ``max_genes`` per cell: the genes with the highest value are kept, ties broken by
   the lower gene id, and the kept genes are stored in that order (highest value first), so a
   later cut to fewer genes (``finetune_max_length``) keeps the highest values too.

No cls token is stored (the model puts its own in front). The dataset has ``input_ids``
(int64) and the parallel ``values`` (float32), ``length``, then the label and kept ``obs``
columns; its ``dataset.info.description`` is the JSON :class:`CellFMStats` with
``"encoding": "cellfm"`` and the fingerprint of the vocabulary it was tokenized with.

:func:`cellfm_encode` is the vectorised core over a block of cells, :func:`tokenize_cellfm` reads
a file chunk by chunk (:mod:`geneformer_peft.data.cell_source`) into a ``datasets.Dataset``.
"""
from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import scipy.sparse as sp

from geneformer_peft.errors import DataError

logger = logging.getLogger(__name__)

__all__ = ["ENCODING", "MAX_GENES", "CellFMStats", "cellfm_encode", "tokenize_cellfm", "vocabulary_fingerprint"]

PathLike = str | Path
ENCODING = "cellfm"
TARGET_SUM = 10_000.0
#: the tutorials' longest cell (and ``CellFMConfig.max_genes``' default)
MAX_GENES = 2048


def vocabulary_fingerprint(token_dictionary: Mapping[str, int]) -> str:
    """SHA-1 of a vocabulary's ``(token, id)`` pairs in token order: equal exactly when two
    dictionaries map the same tokens to the same rows (recorded by :func:`tokenize_cellfm`,
    compared with the checkpoint's ``tokenizer.json`` by the compatibility report)."""
    import hashlib

    pairs = sorted((str(k), int(v)) for k, v in token_dictionary.items())
    return hashlib.sha1(json.dumps(pairs, separators=(",", ":")).encode("utf-8")).hexdigest()


def cellfm_encode(counts: sp.spmatrix | np.ndarray, *, totals: np.ndarray, gene_token_ids: np.ndarray,
                  max_genes: int = MAX_GENES, target_sum: float = TARGET_SUM
                  ) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """CellFM tokens of a block of cells.

    Parameters
    ----------
    counts
        Cells x genes raw counts (scipy sparse or dense); column j is the gene with token id
        ``gene_token_ids[j]`` (no id twice).
    totals
        Each cell's total count over all genes of its file, shape (cells,).
    gene_token_ids
        Token id of each column.
    max_genes
        Most genes kept per cell (the highest values, ties by the lower token id).
    target_sum
        Normalisation total.

    Returns
    -------
    (list of numpy.ndarray, list of numpy.ndarray)
        Per cell the int64 token ids and the float32 ``log1p(count * target_sum / total)`` values,
        highest value first.
    """
    if max_genes < 1:
        raise ValueError(f"max_genes {max_genes!r} is not valid; expected an integer >= 1")
    csr = sp.csr_matrix(counts, dtype=np.float64)
    n_rows = csr.shape[0]
    totals = np.asarray(totals, dtype=np.float64)
    gene_token_ids = np.asarray(gene_token_ids, dtype=np.int64)
    rows = np.repeat(np.arange(n_rows), np.diff(csr.indptr))
    positive = csr.data > 0
    rows, data, tokens = rows[positive], csr.data[positive], gene_token_ids[csr.indices[positive]]
    values = np.log1p(data * target_sum / totals[rows])
    order = np.lexsort((tokens, -values, rows))  # by cell, then value descending, then token id
    rows, tokens, values = rows[order], tokens[order], values[order]
    per_row = np.bincount(rows, minlength=n_rows)
    starts = np.concatenate([[0], np.cumsum(per_row)[:-1]]).astype(np.int64)
    kept = (np.arange(len(rows)) - starts[rows]) < max_genes
    tokens, values = tokens[kept], values[kept].astype(np.float32)
    cuts = np.cumsum(np.minimum(per_row, max_genes))[:-1]
    if not n_rows:
        return [], []
    return np.split(tokens, cuts), np.split(values, cuts)


@dataclass
class CellFMStats:
    """Summary of one CellFM tokenization (also stored as JSON in ``dataset.info.description``)."""

    source: str
    encoding: str
    max_genes: int
    target_sum: float
    kept_genes: str
    n_cells_total: int
    n_cells_kept: int
    n_genes_total: int
    n_genes_matched: int
    n_genes_missing_token: int
    n_file_genes_repeated: int
    matched_count_fraction: float
    n_cells_truncated: int
    n_cells_empty: int
    length_min: int
    length_median: float
    length_max: int
    vocabulary_size: int = 0
    vocabulary_sha1: str = ""
    columns: list[str] = field(default_factory=list)
    gene_name_mapping: dict[str, Any] | None = None

    def to_json(self) -> str:
        """Return the stats as a JSON string."""
        return json.dumps(asdict(self), indent=2)


def tokenize_cellfm(
    path_or_adata: Any,
    *,
    token_dictionary: Mapping[str, int] | PathLike,
    gene_id_column: str | None = None,
    label_column: str | None = None,
    keep_columns: Sequence[str] = (),
    max_genes: int = MAX_GENES,
    target_sum: float = TARGET_SUM,
    chunk_size: int = 512,
    filter_column: str | None = "filter_pass",
    obs_filter: Mapping[str, Any] | None = None,
    show_progress: bool = True,
    cache_dir: PathLike | None = None,
    return_stats: bool = False,
    gene_name_id_dictionary: Mapping[str, str] | PathLike | None = None,
):
    """CellFM-encode a ``.h5ad`` / ``.loom`` file or an AnnData into a ``datasets.Dataset``.

    Parameters
    ----------
    path_or_adata
        ``.h5ad`` path (read in backed mode), ``.loom`` path (needs loompy) or AnnData.
    token_dictionary
        The model's genes ``{gene: row}`` (a converted checkpoint's ``tokenizer.json``, a
        ``{token: id}`` JSON, or a folder holding one), or the dict itself.
    gene_id_column
        ``var`` column holding names of the vocabulary's kind; ``None``: ``var["ensembl_id"]``
        when present, else ``var_names``.
    label_column, keep_columns
        ``obs`` columns copied to the dataset.
    max_genes
        Most genes per cell (the model's ``max_genes``; the release: 2048).
    target_sum
        Normalisation total (1e4).
    chunk_size, filter_column, obs_filter, show_progress, cache_dir, return_stats
        As for :func:`~geneformer_peft.data.rank_value.tokenize_anndata`.
    gene_name_id_dictionary
        Gene symbol -> Ensembl id (a dict, Geneformer's ``gene_name_id_dict.pkl`` or a
        two-column CSV/TSV), applied in the vocabulary's direction: against a vocabulary of
        symbols (the release's) a file's Ensembl ids are translated to symbols, against one of
        Ensembl ids a file's symbols to Ensembl ids (see
        :func:`~geneformer_peft.data.gene_ids.load_gene_name_map`). The figures go to
        ``CellFMStats.gene_name_mapping``. Without it, a file whose ids are of the other kind
        than the vocabulary's is refused up front.

    Returns
    -------
    datasets.Dataset or (datasets.Dataset, CellFMStats)
        Columns ``input_ids`` (list of int64), ``values`` (list of float32, parallel),
        ``length`` (int64), then the label and kept columns; one row per kept cell, in file order.

    Raises
    ------
    DataError
        Missing file / column, 0 cells, no gene of the file in the vocabulary, gene ids of the
        other kind than the vocabulary's without a map, a matrix that is not raw counts.
    """
    import pyarrow as pa

    from geneformer_peft.data.cell_source import iter_cell_chunks, open_cell_source, select_cells
    from geneformer_peft.data.chunk_writer import ChunkWriter, list_column, output_columns
    from geneformer_peft.data.gene_ids import load_gene_name_map, log_gene_name_mapping, vocabulary_gene_ids
    from geneformer_peft.data.rank_value import build_gene_map
    from geneformer_peft.data.vocab import load_token_dictionary

    if not isinstance(max_genes, (int, np.integer)) or isinstance(max_genes, bool) or max_genes < 1:
        raise DataError(f"max_genes {max_genes!r} is not valid; expected an integer >= 1 (CellFM: 2048)")
    if not isinstance(token_dictionary, Mapping):
        token_dictionary = load_token_dictionary(token_dictionary)
    name_map = map_source = target = None
    if gene_name_id_dictionary is not None:
        name_map, map_source, target = load_gene_name_map(gene_name_id_dictionary, token_dictionary)
    with open_cell_source(path_or_adata, gene_id_column=gene_id_column) as cells:
        out_columns = output_columns(cells, label_column, keep_columns, ("input_ids", "values", "length"))
        keep = select_cells(cells.obs, source_name=cells.name, filter_column=filter_column, obs_filter=obs_filter)
        vocab_gene_ids, mapping = vocabulary_gene_ids(cells, token_dictionary, name_map, target)
        column_counts = None if mapping is None else np.zeros(cells.n_genes, dtype=np.float64)
        gene_map = build_gene_map(vocab_gene_ids, token_dictionary, None, source_name=cells.name)
        output = ChunkWriter(cells, out_columns, [("input_ids", pa.list_(pa.int64())),
                                                  ("values", pa.list_(pa.float32())), ("length", pa.int64())],
                             cache_dir=cache_dir, temp_prefix="geneformer_peft_binned_", stem="cellfm")
        lengths_parts: list[np.ndarray] = []
        total_counts = matched_counts = 0.0
        n_truncated = 0
        logger.info("%s: each cell normalised by its total over all %d genes of the file, log1p; at most %d "
                    "expressed genes per cell (highest values first)", cells.name, cells.n_genes, max_genes)
        with output as writer:
            for chunk in iter_cell_chunks(cells, keep, chunk_size=chunk_size, desc="tokenizing",
                                          show_progress=show_progress, use_obs_n_counts=False):
                if column_counts is not None:
                    column_counts += np.asarray(chunk.counts.sum(axis=0)).ravel()
                matched = sp.csr_matrix(gene_map.project(chunk.counts))
                matched.eliminate_zeros()
                expressed = np.diff(matched.indptr)
                total_counts += float(chunk.raw_totals.sum())
                matched_counts += float(matched.sum())
                ids, values = cellfm_encode(matched, totals=chunk.raw_totals, gene_token_ids=gene_map.token_ids,
                                            max_genes=max_genes, target_sum=target_sum)
                n_truncated += int((expressed > max_genes).sum())
                lengths = np.array([len(e) for e in ids], dtype=np.int64)
                lengths_parts.append(lengths)
                flat_ids = np.concatenate(ids) if ids else np.zeros(0, dtype=np.int64)
                flat_values = np.concatenate(values) if values else np.zeros(0, dtype=np.float32)
                writer.write([list_column(lengths, flat_ids, pa.int64()),
                              list_column(lengths, flat_values, pa.float32()), pa.array(lengths)], chunk.rows)
    lengths = np.concatenate(lengths_parts)
    stats = CellFMStats(
        source=cells.name, encoding=ENCODING, max_genes=int(max_genes), target_sum=float(target_sum),
        kept_genes="highest log1p value first, ties by the lower token id",
        n_cells_total=cells.n_cells, n_cells_kept=int(len(lengths)), n_genes_total=gene_map.n_genes_total,
        n_genes_matched=int(len(gene_map.token_ids)), n_genes_missing_token=gene_map.n_missing_token,
        n_file_genes_repeated=gene_map.n_repeated,
        matched_count_fraction=float(matched_counts / total_counts) if total_counts else 0.0,
        n_cells_truncated=n_truncated, n_cells_empty=int((lengths == 0).sum()), length_min=int(lengths.min()),
        length_median=float(np.median(lengths)), length_max=int(lengths.max()),
        vocabulary_size=len(token_dictionary), vocabulary_sha1=vocabulary_fingerprint(token_dictionary),
        columns=["input_ids", "values", "length"] + out_columns,
        gene_name_mapping=(None if mapping is None
                           else mapping.summary(cells.gene_ids, column_counts, source=map_source)))
    logger.info("%s: kept %d of %d cells; %d of %d genes matched the vocabulary (%d without a row) holding %.1f%% "
                "of counts; genes per cell min/median/max %d/%.0f/%d; %d cells cut to %d genes", stats.source,
                stats.n_cells_kept, stats.n_cells_total, stats.n_genes_matched, stats.n_genes_total,
                stats.n_genes_missing_token, 100 * stats.matched_count_fraction, stats.length_min,
                stats.length_median, stats.length_max, n_truncated, max_genes)
    if stats.gene_name_mapping is not None:
        log_gene_name_mapping(stats.source, stats.gene_name_mapping)
    if stats.n_cells_empty:
        logger.warning("%s: %d cells have no count in any vocabulary gene; they are kept with no gene token",
                       stats.source, stats.n_cells_empty)
    dataset = output.dataset(stats.to_json())
    return (dataset, stats) if return_stats else dataset
