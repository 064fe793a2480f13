"""Chunked reading of a cells x genes raw-count matrix from ``.h5ad``, ``.loom`` or an AnnData.

One job: give the tokenizer and the vocabulary builder the same view of an input file —
its cell annotations (``obs``), its gene ids, and blocks of rows as float64 CSR matrices —
while holding at most one block of the matrix in memory (``.h5ad`` files are opened in
backed mode). :meth:`CellSource.detached` hands that view to worker processes, each of which
opens the matrix itself and reads its own row ranges.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import scipy.sparse as sp

from geneformer_peft.errors import DataError

logger = logging.getLogger(__name__)

__all__ = ["CellChunk", "CellSource", "check_raw_counts", "chunk_starts", "iter_cell_chunks", "open_cell_source",
           "read_obs_n_counts", "select_cells"]

PathLike = str | Path


class CellSource:
    """Read-only, chunked access to a cells x genes count matrix.

    Parameters
    ----------
    source
        Path to a ``.h5ad`` file (opened with ``anndata.read_h5ad(path, backed="r")``),
        a ``.loom`` file (needs the ``loom`` extra: ``pip install geneformer-peft[loom]``)
        or an in-memory ``anndata.AnnData``.
    gene_id_column
        Column of ``var`` (row attribute for loom) holding Ensembl ids. ``None`` uses
        ``var["ensembl_id"]`` when that column exists, else ``var_names`` (for loom:
        the ``ensembl_id`` row attribute).
    """

    def __init__(self, source: Any, *, gene_id_column: str | None = None) -> None:
        self._adata = None
        self._loom = None
        self._owns_file = False
        #: the file, for :meth:`detached` copies to open in their own process (None: AnnData in memory)
        self._path: Path | None = None
        #: X of an .h5ad opened by a detached copy (h5py file, matrix)
        self._h5_file = self._h5_matrix = None
        #: Where the gene ids were read, for messages: ``"var_names"``, ``"var['ensembl_id']"``...
        self.gene_id_field = "gene ids"
        if isinstance(source, (str, Path)):
            path = Path(source)
            self.name = str(path)
            self._path = path
            if not path.exists():
                raise DataError(f"{self.name}: input file does not exist; expected a .h5ad or .loom file")
            suffix = path.suffix.lower()
            if suffix == ".h5ad":
                import anndata
                import h5py

                if not h5py.is_hdf5(path):
                    raise DataError(f"{self.name}: not an HDF5 file (so not an .h5ad); expected an AnnData file "
                                    "written by anndata's write_h5ad")
                try:
                    self._adata = anndata.read_h5ad(path, backed="r")
                except (OSError, KeyError, ValueError) as error:
                    raise DataError(f"{self.name}: could not be read as an .h5ad ({type(error).__name__}: "
                                    f"{error}); expected an AnnData file written by anndata's write_h5ad") from None
                self._owns_file = True
            elif suffix == ".loom":
                self._open_loom(path)
            else:
                raise DataError(
                    f"{self.name}: file extension {suffix!r} is not supported; expected '.h5ad' or '.loom'"
                )
        else:
            import anndata

            if not isinstance(source, anndata.AnnData):
                raise DataError(
                    f"input of type {type(source).__name__!r} is not supported; "
                    "expected a path to a .h5ad/.loom file or an anndata.AnnData"
                )
            self.name = "<AnnData in memory>"
            self._adata = source
            if getattr(source, "isbacked", False) and not source.is_view:
                self._path = Path(source.filename)  # detached copies open the file, not this handle

        if self._adata is not None:
            if self._adata.X is None:
                raise DataError(f"{self.name}: field X is empty (None); expected a cells x genes raw-count matrix")
            self.obs = self._adata.obs
            self.gene_ids = self._adata_gene_ids(gene_id_column)
            self.n_cells = int(self._adata.n_obs)
            if getattr(self._adata, "isbacked", False) and "csc" in type(self._adata.X).__name__.lower():
                logger.warning("%s: X is stored column-major (CSC); reading it by rows is slow", self.name)
        self.gene_ids = np.asarray(self.gene_ids).astype(str)
        self.n_genes = len(self.gene_ids)

    # -- construction helpers --------------------------------------------------------------
    def _adata_gene_ids(self, gene_id_column: str | None) -> np.ndarray:
        var = self._adata.var
        if gene_id_column is None:
            if "ensembl_id" in var.columns:
                logger.info("%s: gene ids from var['ensembl_id']", self.name)
                self.gene_id_field = "var['ensembl_id']"
                return var["ensembl_id"].to_numpy()
            logger.info("%s: gene ids from var_names", self.name)
            self.gene_id_field = "var_names"
            return np.asarray(self._adata.var_names)
        if gene_id_column == "var_names" and gene_id_column not in var.columns:  # the index, named explicitly
            logger.info("%s: gene ids from var_names", self.name)
            self.gene_id_field = "var_names"
            return np.asarray(self._adata.var_names)
        if gene_id_column not in var.columns:
            raise DataError(
                f"{self.name}: gene id column var[{gene_id_column!r}] does not exist; "
                f"expected one of {sorted(map(str, var.columns))}, or 'var_names' (the index)"
            )
        self.gene_id_field = f"var[{gene_id_column!r}]"
        return var[gene_id_column].to_numpy()

    def _open_loom(self, path: Path) -> None:
        try:
            import loompy
        except ImportError as exc:
            raise DataError(
                f"{self.name}: reading .loom files needs loompy; install the 'loom' extra "
                "(pip install 'geneformer-peft[loom]')"
            ) from exc
        self._loom = loompy.connect(str(path), mode="r", validate=False)
        self._owns_file = True
        self.obs = pd.DataFrame({key: self._loom.ca[key] for key in self._loom.ca.keys()})
        self.n_cells = int(self._loom.shape[1])

    # -- public API ---------------------------------------------------------------------------
    def set_loom_gene_ids(self, gene_id_column: str | None) -> None:
        """Pick the loom row attribute holding gene ids (internal use)."""
        column = gene_id_column or "ensembl_id"
        if column not in self._loom.ra.keys():
            raise DataError(
                f"{self.name}: gene id row attribute {column!r} does not exist; "
                f"expected one of {sorted(self._loom.ra.keys())}"
            )
        self.gene_ids = np.asarray(self._loom.ra[column]).astype(str)
        self.gene_id_field = f"row attribute {column!r}"
        self.n_genes = len(self.gene_ids)

    def read_rows(self, start: int, stop: int) -> sp.csr_matrix:
        """Return cells ``start:stop`` as a float64 CSR matrix (cells x all genes)."""
        if self._loom is None and self._adata is None and self._h5_matrix is None:
            self._open_matrix()
        if self._loom is not None:
            block = sp.csr_matrix(np.asarray(self._loom[:, start:stop]).T)
        else:
            block = (self._h5_matrix if self._h5_matrix is not None else self._adata.X)[start:stop]
            block = sp.csr_matrix(block) if not sp.issparse(block) else block.tocsr()
        return block.astype(np.float64)

    def detached(self) -> CellSource:
        """A copy for a worker process: no open file, ``obs`` cut to its index and ``n_counts``.

        The copy can be inherited by a forked process or pickled to a spawned one; its first
        :meth:`read_rows` opens the file's matrix in that process (only X, as backed mode reads
        it: neither ``obs`` nor ``var`` is read again), so no counts travel between processes.
        An AnnData in memory is carried as it is.
        """
        copy = object.__new__(CellSource)
        copy.__dict__.update(self.__dict__)
        copy.obs = self.obs[[c for c in ("n_counts",) if c in self.obs.columns]]
        copy._owns_file = False
        copy._loom = copy._h5_file = copy._h5_matrix = None
        if self._path is not None:
            copy._adata = None
        return copy

    def _open_matrix(self) -> None:
        """Open this (detached) source's matrix in the calling process."""
        if self._path.suffix.lower() == ".loom":
            import loompy

            self._loom = loompy.connect(str(self._path), mode="r", validate=False)
        else:
            import h5py

            self._h5_file = h5py.File(self._path, "r")
            matrix = self._h5_file["X"]
            # the class anndata's backed mode wraps a sparse X in, so both read rows alike
            self._h5_matrix = _sparse_dataset(matrix) if isinstance(matrix, h5py.Group) else matrix
        self._owns_file = True

    def close(self) -> None:
        """Close the underlying file when this object opened it."""
        if not self._owns_file:
            return
        if self._loom is not None:
            self._loom.close()
        elif self._h5_file is not None:
            self._h5_file.close()
            self._h5_file = self._h5_matrix = None
        elif self._adata is not None and getattr(self._adata, "file", None) is not None:
            self._adata.file.close()
        self._owns_file = False

    def __enter__(self) -> CellSource:
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()


def _sparse_dataset(group: Any) -> Any:
    """anndata's backed view of a sparse matrix group (its module moved across versions)."""
    try:
        from anndata.io import sparse_dataset
    except ImportError:
        try:
            from anndata.experimental import sparse_dataset
        except ImportError:  # anndata 0.9
            from anndata._core.sparse_dataset import SparseDataset as sparse_dataset
    return sparse_dataset(group)


@dataclass
class CellChunk:
    """One block of kept cells, read and checked by :func:`iter_cell_chunks`.

    Attributes
    ----------
    start, stop
        The block's rows in the file (``start:stop``; only the kept ones are below).
    rows
        File row of each kept cell.
    cell_names
        ``obs`` index of each kept cell.
    counts
        Raw counts of the kept cells, float64 CSR (cells x all genes of the file).
    raw_totals
        Each kept cell's total over all genes of the file.
    n_counts
        Each kept cell's normalisation total: ``obs["n_counts"]`` when the file has it,
        else ``raw_totals``.
    """

    start: int
    stop: int
    rows: np.ndarray
    cell_names: pd.Index
    counts: sp.csr_matrix
    raw_totals: np.ndarray
    n_counts: np.ndarray


def iter_cell_chunks(cells: CellSource, keep: np.ndarray, *, chunk_size: int = 512, desc: str = "reading",
                     show_progress: bool = True, use_obs_n_counts: bool = True,
                     starts: Sequence[int] | None = None) -> Iterator[CellChunk]:
    """Read ``cells`` block by block, checking that every block holds raw counts.

    Blocks without a kept cell are not read. At most one block of the matrix is in
    memory at a time.

    Parameters
    ----------
    cells
        An open :class:`CellSource`.
    keep
        Boolean mask over the file's cells (see :func:`select_cells`).
    chunk_size
        Cells per block.
    desc, show_progress
        The tqdm progress bar's label, and whether to show it.
    use_obs_n_counts
        Take ``n_counts`` from ``obs["n_counts"]`` when that column exists (logged once).
    starts
        Read only the blocks starting at these rows (multiples of ``chunk_size``, as
        :func:`chunk_starts` gives them), e.g. a worker process's share; default: all. The
        ``n_counts`` source is then logged at DEBUG (the caller reports it once).

    Yields
    ------
    CellChunk
        One per block with at least one kept cell, in file order.

    Raises
    ------
    DataError
        If ``chunk_size`` is not positive, or a block holds values that are not raw counts.
    """
    from tqdm.auto import tqdm

    if not isinstance(chunk_size, (int, np.integer)) or chunk_size < 1:
        raise DataError(f"chunk_size {chunk_size!r} is not valid; expected a positive integer")
    obs_n_counts = read_obs_n_counts(cells, use_obs_n_counts=use_obs_n_counts,
                                     level=logging.INFO if starts is None else logging.DEBUG)
    if starts is None:
        starts = range(0, cells.n_cells, chunk_size)
    for start in tqdm(starts, desc=f"{desc} {Path(cells.name).name}", disable=not show_progress):
        stop = min(start + chunk_size, cells.n_cells)
        chunk_keep = keep[start:stop]
        if not chunk_keep.any():
            continue
        block = cells.read_rows(start, stop)
        cell_names = cells.obs.index[start:stop]
        check_raw_counts(block, source_name=cells.name, cell_names=cell_names, gene_ids=cells.gene_ids)
        raw_totals = np.asarray(block.sum(axis=1)).ravel()
        n_counts = raw_totals if obs_n_counts is None else obs_n_counts[start:stop]
        yield CellChunk(start=start, stop=stop, rows=np.flatnonzero(chunk_keep) + start,
                        cell_names=cell_names[chunk_keep], counts=block[chunk_keep],
                        raw_totals=raw_totals[chunk_keep], n_counts=n_counts[chunk_keep])


def read_obs_n_counts(cells: CellSource, *, use_obs_n_counts: bool = True,
                      level: int = logging.INFO) -> np.ndarray | None:
    """``obs["n_counts"]`` as float64 when the file has it (and it is to be used), else ``None``
    (each chunk's totals are then computed from X); says which at ``level``."""
    if use_obs_n_counts and "n_counts" in cells.obs.columns:
        logger.log(level, "%s: n_counts from obs['n_counts']", cells.name)
        return cells.obs["n_counts"].to_numpy(dtype=np.float64)
    logger.log(level, "%s: n_counts computed from X over all %d genes", cells.name, cells.n_genes)
    return None


def chunk_starts(keep: np.ndarray, chunk_size: int) -> list[int]:
    """The first rows of the ``chunk_size`` blocks holding a kept cell, in file order: the
    blocks :func:`iter_cell_chunks` reads."""
    n_blocks = -(-len(keep) // chunk_size)
    padded = np.zeros(n_blocks * chunk_size, dtype=bool)
    padded[:len(keep)] = keep
    return [int(b) * chunk_size for b in np.flatnonzero(padded.reshape(n_blocks, chunk_size).any(axis=1))]


def open_cell_source(source: Any, *, gene_id_column: str | None = None) -> CellSource:
    """Open ``source`` and resolve its gene ids (handles loom row attributes too)."""
    cells = CellSource(source, gene_id_column=gene_id_column)
    if cells._loom is not None:
        cells.set_loom_gene_ids(gene_id_column)
    if cells.n_cells == 0:
        cells.close()
        raise DataError(f"{cells.name}: the file holds 0 cells; expected at least one cell")
    return cells


def check_raw_counts(
    block: sp.csr_matrix, *, source_name: str, cell_names: Sequence[Any], gene_ids: np.ndarray
) -> None:
    """Raise :class:`DataError` unless every stored value of ``block`` is a non-negative integer.

    Normalised or log-transformed data cannot be rank-value encoded against Geneformer's
    medians, so it is refused rather than silently mis-tokenized.
    """
    data = block.data
    bad = np.flatnonzero((data < 0) | (data != np.round(data)) | ~np.isfinite(data))
    if bad.size == 0:
        return
    position = int(bad[0])
    row = int(np.searchsorted(block.indptr, position, side="right") - 1)
    gene = str(gene_ids[block.indices[position]])
    raise DataError(
        f"{source_name}: field X (counts) holds value {float(data[position])!r} for cell {str(cell_names[row])!r}, "
        f"gene {gene!r} ({bad.size} such values in this block); expected raw counts "
        "(non-negative integers) — normalised or log-transformed data is not accepted"
    )


def select_cells(
    obs: pd.DataFrame,
    *,
    source_name: str,
    filter_column: str | None = "filter_pass",
    obs_filter: Mapping[str, Any] | None = None,
) -> np.ndarray:
    """Return a boolean mask of the cells to keep, logging how many each filter removed.

    Parameters
    ----------
    obs
        Cell annotations.
    source_name
        File name used in messages.
    filter_column
        Geneformer's ``filter_pass`` convention: when this column exists only cells with
        value 1 are kept; when it does not exist, no cell is removed by it.
    obs_filter
        ``{column: value}`` or ``{column: [values]}``; keeps cells whose ``obs[column]``,
        compared as strings, equals one of the values (e.g. ``{"demuxlet_cls": "SNG"}``).
    """
    keep = np.ones(len(obs), dtype=bool)
    if filter_column is not None and filter_column in obs.columns:
        passed = pd.to_numeric(obs[filter_column], errors="coerce").to_numpy() == 1
        logger.info(
            "%s: obs[%r] == 1 keeps %d of %d cells", source_name, filter_column, int(passed.sum()), len(obs)
        )
        keep &= passed
    for column, wanted in (obs_filter or {}).items():
        if column not in obs.columns:
            raise DataError(
                f"{source_name}: obs filter column obs[{column!r}] does not exist; "
                f"expected one of {sorted(map(str, obs.columns))}"
            )
        values = [wanted] if isinstance(wanted, (str, int, float, bool)) else list(wanted)
        matched = obs[column].astype(str).isin([str(v) for v in values]).to_numpy()
        logger.info(
            "%s: obs[%r] in %s keeps %d of %d cells", source_name, column, values, int(matched.sum()), len(obs)
        )
        keep &= matched
    if not keep.any():
        raise DataError(
            f"{source_name}: no cell passes the filters (filter_column={filter_column!r}, "
            f"obs_filter={dict(obs_filter or {})!r}); expected at least one cell"
        )
    return keep
