"""scBERT's binned expression encoding of single-cell raw counts.

For a fixed gene panel (scBERT's released model: 16,906 gene symbols), every panel gene is a
position, in the panel's order. Per cell:

1. counts aligned to the panel (genes absent from the file are 0; a gene id repeated in
   the file takes its first column, as scBERT's preprocessing did);
2. cells with fewer than ``min_genes`` (200) expressed panel genes are dropped (counted and
   logged);
3. ``x = count * target_sum / total`` with ``total`` the cell's count over the panel genes
   (``normalize_total(target_sum=1e4)`` on the aligned matrix);
4. token = ``floor(log2(1 + x))`` capped at ``bin_num`` (5): an integer in ``0..bin_num``;
5. one extra position with token 0 appended: ``gene_num + 1`` tokens, stored as uint8.

:func:`align_to_panel` is the vectorised alignment (a sort and a binary search, replacing
scBERT's quadratic loop), :func:`binned_encode` the core over a block of cells and
:func:`tokenize_binned` reads a file chunk by chunk into a ``datasets.Dataset``.
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

__all__ = [
    "GENE2VEC_FILE",
    "GENE_PANEL_FILE",
    "BinnedStats",
    "PanelAlignment",
    "align_to_panel",
    "binned_encode",
    "read_gene2vec",
    "read_gene_panel",
    "tokenize_binned",
    "write_panel_files",
]

PathLike = str | Path
TARGET_SUM = 10_000.0
BIN_NUM = 5
MIN_GENES = 200
#: files written beside a binned dataset (and read by the scBERT model side)
GENE_PANEL_FILE = "gene_panel.txt"
GENE2VEC_FILE = "gene2vec.npy"


# ---------------------------------------------------------------------------------------------
# Panel files
# ---------------------------------------------------------------------------------------------
def read_gene_panel(path: PathLike) -> np.ndarray:
    """Gene names of a panel, in position order: a ``.txt`` file (one name a line) or a ``.npy``
    array of strings.

    Raises
    ------
    DataError
        Missing file, another extension, an empty name, a repeated name or no name at all.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"--gene_panel {path} does not exist; expected a .txt (one gene a line) or .npy file")
    suffix = path.suffix.lower()
    if suffix == ".txt":
        names = np.array([line.strip() for line in path.read_text(encoding="utf-8").splitlines()], dtype=object)
        while len(names) and names[-1] == "":  # a trailing newline
            names = names[:-1]
    elif suffix == ".npy":
        array = np.load(path, allow_pickle=False)
        if array.ndim != 1 or array.dtype.kind not in "US":
            raise DataError(f"{path}: holds a {array.dtype} array of shape {array.shape}; expected a 1-d array of "
                            "gene names (strings)")
        names = np.array([str(n).strip() for n in array.astype(str)], dtype=object)
    else:
        raise DataError(f"{path}: gene panel extension {suffix!r} is not supported; expected '.txt' or '.npy'")
    if len(names) == 0:
        raise DataError(f"{path}: the gene panel is empty; expected at least one gene name")
    empty = np.flatnonzero(names == "")
    if empty.size:
        raise DataError(f"{path}: line {int(empty[0]) + 1} of the gene panel is empty; expected one gene name a line")
    unique, counts = np.unique(names.astype(str), return_counts=True)
    if (counts > 1).any():
        repeated = [str(g) for g in unique[counts > 1][:5]]
        raise DataError(f"{path}: gene panel names repeat ({int((counts > 1).sum())} of them, e.g. {repeated}); "
                        "expected each gene once (one position per gene)")
    return names.astype(str)


def read_gene2vec(path: PathLike, *, n_genes: int | None = None) -> np.ndarray:
    """A (genes, dim) float32 matrix of gene vectors from ``.npy``, rows in the panel's order;
    ``n_genes`` checks the number of rows."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"--gene2vec {path} does not exist; expected a .npy file of gene vectors (genes x dim)")
    if path.suffix.lower() != ".npy":
        raise DataError(f"{path}: gene2vec extension {path.suffix!r} is not supported; expected '.npy'")
    array = np.load(path, allow_pickle=False)
    if array.ndim != 2 or array.dtype.kind != "f" or not np.isfinite(array).all():
        raise DataError(f"{path}: holds a {array.dtype} array of shape {array.shape}; expected a 2-d array of "
                        "finite floats (genes x dim)")
    if n_genes is not None and array.shape[0] != n_genes:
        raise DataError(f"{path}: has {array.shape[0]} gene vectors; expected {n_genes}, one per gene of the panel, "
                        "in its order")
    return array.astype(np.float32)


def write_panel_files(directory: PathLike, panel: Sequence[str], gene2vec: np.ndarray | None) -> None:
    """Write ``gene_panel.txt`` (and ``gene2vec.npy`` when given) into ``directory``."""
    directory = Path(directory)
    (directory / GENE_PANEL_FILE).write_text("".join(f"{g}\n" for g in panel), encoding="utf-8")
    if gene2vec is not None:
        np.save(directory / GENE2VEC_FILE, np.asarray(gene2vec, dtype=np.float32))


# ---------------------------------------------------------------------------------------------
# Alignment
# ---------------------------------------------------------------------------------------------
@dataclass
class PanelAlignment:
    """Where each panel gene is in a file: ``file_columns[i]`` is the file's column of panel
    gene i, or -1 when the file lacks it."""

    file_columns: np.ndarray
    n_file_genes: int
    n_repeated: int
    _selector: sp.csr_matrix = field(repr=False, default=None)

    @property
    def n_panel_genes(self) -> int:
        return len(self.file_columns)

    @property
    def n_present(self) -> int:
        return int((self.file_columns >= 0).sum())

    def project(self, block: sp.csr_matrix) -> sp.csr_matrix:
        """Cells x file genes -> cells x panel genes (panel order, absent genes 0), one sparse product."""
        if self._selector is None:
            positions = np.flatnonzero(self.file_columns >= 0)
            self._selector = sp.csr_matrix(
                (np.ones(len(positions)), (self.file_columns[positions], positions)),
                shape=(self.n_file_genes, self.n_panel_genes))
        out = sp.csr_matrix(block) @ self._selector
        out.eliminate_zeros()  # stored zeros of the file are not expressed genes
        out.sort_indices()
        return out


def align_to_panel(gene_ids: Sequence[str], panel: Sequence[str], *, source_name: str = "input") -> PanelAlignment:
    """Match a file's gene ids to the panel: O((file + panel) log file), no Python loop.

    A gene id the file repeats maps to its first column (as scBERT's ``list.index``); the
    number of such ids is logged.

    Raises
    ------
    DataError
        When no panel gene is in the file (the wrong id column, e.g. Ensembl ids against a
        panel of symbols).
    """
    gene_ids = np.asarray(gene_ids).astype(str)
    panel = np.asarray(panel).astype(str)
    unique, first = np.unique(gene_ids, return_index=True)  # sorted; first column of each id
    n_repeated = len(gene_ids) - len(unique)
    slot = np.searchsorted(unique, panel).clip(max=max(len(unique) - 1, 0))
    found = unique[slot] == panel if len(unique) else np.zeros(len(panel), dtype=bool)
    file_columns = np.where(found, first[slot], -1).astype(np.int64)
    alignment = PanelAlignment(file_columns=file_columns, n_file_genes=len(gene_ids), n_repeated=n_repeated)
    if alignment.n_present == 0:
        raise DataError(
            f"{source_name}: none of the {len(panel)} panel genes (e.g. {[str(g) for g in panel[:3]]}) is among the "
            f"file's {len(gene_ids)} gene ids (e.g. {[str(g) for g in gene_ids[:3]]}); expected the same kind of "
            "names (pick the var column with --gene_id_column)")
    if n_repeated:
        logger.warning("%s: %d gene ids repeat in the file; each panel gene takes the first column of its id",
                       source_name, n_repeated)
    logger.info("%s: %d of %d panel genes are in the file (%d absent, zeros); %d of the file's %d genes are not "
                "in the panel", source_name, alignment.n_present, len(panel), len(panel) - alignment.n_present,
                len(gene_ids) - alignment.n_present - n_repeated, len(gene_ids))
    return alignment


# ---------------------------------------------------------------------------------------------
# Core
# ---------------------------------------------------------------------------------------------
def binned_encode(counts: sp.spmatrix | np.ndarray, *, bin_num: int = BIN_NUM,
                  target_sum: float = TARGET_SUM) -> np.ndarray:
    """Binned tokens of a block of cells already aligned to the panel.

    Parameters
    ----------
    counts
        Cells x panel genes raw counts (scipy sparse or dense).
    bin_num
        Highest bin; tokens are ``0..bin_num`` (at most 254, so they fit uint8 with the mask
        token ``bin_num + 1``).
    target_sum
        Normalisation total.

    Returns
    -------
    numpy.ndarray
        uint8 (cells, panel genes + 1): ``min(floor(log2(1 + count * target_sum / total)), bin_num)``
        per gene, then the extra position 0. A cell without counts is all zeros.
    """
    if not 1 <= bin_num <= 254:
        raise ValueError(f"bin_num {bin_num!r} is not valid; expected an integer in [1, 254]")
    csr = sp.csr_matrix(counts, dtype=np.float64)
    n_cells, n_genes = csr.shape
    totals = np.asarray(csr.sum(axis=1)).ravel()
    rows = np.repeat(np.arange(n_cells), np.diff(csr.indptr))
    # count * target_sum is exact for counts < 2**53 / 1e4, so x is correctly rounded and
    # x = 2**k - 1 exactly when it is so mathematically: log2(1 + x) is then exactly k
    with np.errstate(divide="ignore", invalid="ignore"):
        x = csr.data * target_sum / totals[rows]
    bins = np.minimum(np.floor(np.log2(1.0 + x)), bin_num)
    out = np.zeros((n_cells, n_genes + 1), dtype=np.uint8)
    positive = csr.data > 0
    out[rows[positive], csr.indices[positive]] = bins[positive].astype(np.uint8)
    return out


# ---------------------------------------------------------------------------------------------
# Files
# ---------------------------------------------------------------------------------------------
@dataclass
class BinnedStats:
    """Summary of one binned tokenization (also stored as JSON in ``dataset.info.description``)."""

    source: str
    encoding: str
    bin_num: int
    gene_num: int
    target_sum: float
    min_genes: int
    n_cells_total: int
    n_cells_kept: int
    n_cells_filtered: int
    n_cells_below_min_genes: int
    n_panel_genes_present: int
    n_panel_genes_absent: int
    n_file_genes: int
    n_file_genes_repeated: int
    expressed_genes_median: float
    gene2vec: str | None = None
    columns: list[str] = field(default_factory=list)

    def to_json(self) -> str:
        """Return the stats as a JSON string."""
        return json.dumps(asdict(self), indent=2)


def tokenize_binned(
    path_or_adata: Any,
    *,
    gene_panel: Sequence[str] | PathLike,
    gene_id_column: str | None = None,
    label_column: str | None = None,
    keep_columns: Sequence[str] = (),
    bin_num: int = BIN_NUM,
    min_genes: int = MIN_GENES,
    target_sum: float = TARGET_SUM,
    chunk_size: int = 512,
    filter_column: str | None = "filter_pass",
    obs_filter: Mapping[str, Any] | None = None,
    show_progress: bool = True,
    cache_dir: PathLike | None = None,
    return_stats: bool = False,
):
    """Binned-encode a ``.h5ad`` / ``.loom`` file or an AnnData into a ``datasets.Dataset``.

    Parameters
    ----------
    path_or_adata
        ``.h5ad`` path (read in backed mode), ``.loom`` path (needs loompy) or AnnData.
    gene_panel
        The model's genes in position order, or a ``.txt`` / ``.npy`` file of them.
    gene_id_column
        ``var`` column holding names of the panel's kind; ``None``: ``var["ensembl_id"]``
        when present, else ``var_names``.
    label_column, keep_columns
        ``obs`` columns copied to the dataset (as the rank-value tokenizer does).
    bin_num, min_genes, target_sum
        Highest bin (5), minimum expressed panel genes of a kept cell (200), normalisation
        total (1e4).
    chunk_size
        Cells read at a time (memory stays flat in the number of cells).
    filter_column, obs_filter
        Cell filters, as for :func:`~geneformer_peft.data.rank_value.tokenize_anndata`.
    show_progress
        Show a tqdm progress bar.
    cache_dir
        Where the Arrow file backing the dataset is written (default: a temporary directory
        removed at exit; call ``save_to_disk`` to keep the dataset).
    return_stats
        Also return the :class:`BinnedStats`.

    Returns
    -------
    datasets.Dataset or (datasets.Dataset, BinnedStats)
        Columns ``input_ids`` (list of uint8, ``gene_num + 1`` each), ``length`` (int64), then
        the label and kept columns; one row per kept cell, in file order.

    Raises
    ------
    DataError
        Missing file / column, 0 cells, no panel gene in the file, a matrix that is not raw
        counts, or no cell left after the filters.
    """
    import pyarrow as pa

    from geneformer_peft.data.cell_source import iter_cell_chunks, open_cell_source, select_cells
    from geneformer_peft.data.chunk_writer import ChunkWriter, list_column, output_columns

    if min_genes < 0:
        raise DataError(f"min_genes {min_genes!r} is not valid; expected an integer >= 0")
    if not 1 <= bin_num <= 254:
        raise DataError(f"bin_num {bin_num!r} is not valid; expected an integer in [1, 254]")
    panel = read_gene_panel(gene_panel) if isinstance(gene_panel, (str, Path)) else np.asarray(gene_panel).astype(str)
    with open_cell_source(path_or_adata, gene_id_column=gene_id_column) as cells:
        out_columns = output_columns(cells, label_column, keep_columns, ("input_ids", "length"))
        keep = select_cells(cells.obs, source_name=cells.name, filter_column=filter_column, obs_filter=obs_filter)
        alignment = align_to_panel(cells.gene_ids, panel, source_name=cells.name)
        output = ChunkWriter(cells, out_columns, [("input_ids", pa.list_(pa.uint8())), ("length", pa.int64())],
                             cache_dir=cache_dir, temp_prefix="geneformer_peft_binned_", stem="binned")
        width = len(panel) + 1
        n_kept = n_low = 0
        expressed_parts: list[np.ndarray] = []
        logger.info("%s: each cell normalised by its total over the %d panel genes (scBERT)", cells.name, len(panel))
        with output as writer:
            for chunk in iter_cell_chunks(cells, keep, chunk_size=chunk_size, desc="binning",
                                          show_progress=show_progress, use_obs_n_counts=False):
                aligned = alignment.project(chunk.counts)
                expressed = np.diff(aligned.indptr)  # stored entries are counts > 0 (checked raw counts)
                enough = expressed >= min_genes
                n_low += int((~enough).sum())
                if not enough.any():
                    continue
                tokens = binned_encode(aligned[enough], bin_num=bin_num, target_sum=target_sum)
                expressed_parts.append(expressed[enough])
                n_kept += len(tokens)
                lengths = np.full(len(tokens), width, dtype=np.int64)
                writer.write([list_column(lengths, tokens.ravel(), pa.uint8()), pa.array(lengths)], chunk.rows[enough])
        n_filtered = int((~keep).sum())
        if n_low:
            logger.warning("%s: dropped %d of %d cells with fewer than %d expressed panel genes (scBERT's filter)",
                           cells.name, n_low, int(keep.sum()), min_genes)
        if n_kept == 0:
            raise DataError(f"{cells.name}: no cell has at least min_genes={min_genes} expressed panel genes "
                            f"({n_low} cells below it); expected at least one cell (check the gene panel and "
                            "--gene_id_column)")
        stats = BinnedStats(
            source=cells.name, encoding="binned", bin_num=bin_num, gene_num=len(panel), target_sum=float(target_sum),
            min_genes=min_genes, n_cells_total=cells.n_cells, n_cells_kept=n_kept, n_cells_filtered=n_filtered,
            n_cells_below_min_genes=n_low, n_panel_genes_present=alignment.n_present,
            n_panel_genes_absent=len(panel) - alignment.n_present, n_file_genes=alignment.n_file_genes,
            n_file_genes_repeated=alignment.n_repeated,
            expressed_genes_median=float(np.median(np.concatenate(expressed_parts))),
            columns=["input_ids", "length"] + out_columns)
    logger.info("%s: kept %d of %d cells (%d removed by filters, %d below %d expressed panel genes); %d positions "
                "per cell (%d panel genes + 1), tokens 0..%d", stats.source, n_kept, stats.n_cells_total, n_filtered,
                n_low, min_genes, width, len(panel), bin_num)
    dataset = output.dataset(stats.to_json())
    return (dataset, stats) if return_stats else dataset
