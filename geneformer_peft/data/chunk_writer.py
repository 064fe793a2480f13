"""Writing a tokenized dataset chunk by chunk: the part the three tokenizers (rank-value,
binned, CellFM) share around their own encoding.

Each tokenizer checks the ``obs`` columns it copies (:func:`output_columns`), opens a
:class:`ChunkWriter` on its token columns, and for every chunk of cells
(:func:`~geneformer_peft.data.cell_source.iter_cell_chunks`) hands it the encoded token
columns and the chunk's rows; the writer appends one Arrow record batch with the ``obs``
columns taken at those rows, so memory stays flat in the number of cells. The finished file
is opened as a memory-mapped ``datasets.Dataset`` (:meth:`ChunkWriter.dataset`).
"""
from __future__ import annotations

import atexit
import shutil
import tempfile
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from geneformer_peft.errors import DataError

PathLike = str | Path

#: temporary folders of datasets written without a ``cache_dir``; removed at exit
_TEMP_DIRS: list[str] = []


def _cleanup_temp_dirs() -> None:
    for directory in _TEMP_DIRS:
        shutil.rmtree(directory, ignore_errors=True)


atexit.register(_cleanup_temp_dirs)


def work_dir(cache_dir: PathLike | None, *, prefix: str) -> str:
    """``cache_dir`` (created if needed), or a new temporary folder named ``prefix...`` that is
    removed at exit."""
    if cache_dir is None:
        directory = tempfile.mkdtemp(prefix=prefix)
        _TEMP_DIRS.append(directory)
        return directory
    Path(cache_dir).mkdir(parents=True, exist_ok=True)
    return str(cache_dir)


def obs_arrow_column(series: Any):
    """Convert an obs column to an Arrow array whose type is fixed for the whole file."""
    import pandas as pd
    import pyarrow as pa

    if isinstance(series.dtype, pd.CategoricalDtype):
        series = series.astype(object)
    try:
        return pa.array(series.to_numpy(), from_pandas=True)
    except (pa.ArrowInvalid, pa.ArrowTypeError) as exc:
        raise DataError(
            f"obs[{series.name!r}] mixes value types ({exc}); expected one type per column (e.g. all strings)"
        ) from exc


def output_columns(cells: Any, label_column: str | None, keep_columns: Sequence[str],
                   dataset_columns: Sequence[str]) -> list[str]:
    """The ``obs`` columns copied to the dataset: the label column, then the kept ones.

    Parameters
    ----------
    cells
        The open :class:`~geneformer_peft.data.cell_source.CellSource`.
    label_column, keep_columns
        As given to the tokenizer.
    dataset_columns
        The tokenizer's own columns, which no ``obs`` column may be named like.

    Raises
    ------
    DataError
        A column that ``obs`` does not hold, or one named like a dataset column.
    """
    out = ([label_column] if label_column else []) + [c for c in keep_columns if c != label_column]
    for column in out:
        if column not in cells.obs.columns:
            field_name = "label column" if column == label_column else "keep column"
            raise DataError(f"{cells.name}: {field_name} obs[{column!r}] does not exist; "
                            f"expected one of {sorted(map(str, cells.obs.columns))}")
    if column_clash := set(dataset_columns) & set(out):
        raise DataError(f"{cells.name}: obs columns {sorted(column_clash)} clash with dataset columns")
    return out


def list_column(lengths: np.ndarray, flat: np.ndarray, value_type: Any):
    """An Arrow list column of ``len(lengths)`` rows from the rows' values laid end to end."""
    import pyarrow as pa

    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(flat, type=value_type))


class ChunkWriter:
    """An Arrow stream file of a tokenized dataset, written one chunk of cells at a time.

    Parameters
    ----------
    cells
        The open cell source; its ``obs`` columns ``columns`` are converted once
        (:func:`obs_arrow_column`, kept in ``obs_arrays``).
    columns
        The ``obs`` columns to copy (:func:`output_columns`), after the token columns.
    token_fields
        ``(name, Arrow type)`` of the tokenizer's own columns, in order.
    cache_dir, temp_prefix
        Where the file goes: ``cache_dir``, else a temporary folder ``temp_prefix...``
        removed at exit (:func:`work_dir`).
    stem
        The file's name before a random suffix: ``{stem}-{hex}.arrow``.

    Use as a context manager; :meth:`write` once per chunk, :meth:`dataset` after closing.
    """

    def __init__(self, cells: Any, columns: Sequence[str], token_fields: Sequence[tuple[str, Any]], *,
                 cache_dir: PathLike | None, temp_prefix: str, stem: str) -> None:
        import pyarrow as pa

        self.obs_arrays = {c: obs_arrow_column(cells.obs[c]) for c in columns}
        self.schema = pa.schema(list(token_fields) + [(c, a.type) for c, a in self.obs_arrays.items()])
        self._cache_dir, self._temp_prefix, self._stem = cache_dir, temp_prefix, stem
        self.path: str | None = None
        self._sink = self._writer = None

    def __enter__(self) -> ChunkWriter:
        import pyarrow as pa

        folder = Path(work_dir(self._cache_dir, prefix=self._temp_prefix))
        self.path = str(folder / f"{self._stem}-{uuid.uuid4().hex}.arrow")
        self._sink = pa.OSFile(self.path, "wb")
        try:
            self._writer = pa.ipc.new_stream(self._sink, self.schema)
        except BaseException:
            self._sink.close()
            raise
        return self

    def __exit__(self, *exc: Any) -> None:
        try:
            self._writer.close()
        finally:
            self._sink.close()

    def write(self, token_arrays: Sequence[Any], rows: np.ndarray) -> None:
        """Append one chunk: its token columns (one entry per cell) and, taken at ``rows`` (the
        cells' positions in ``obs``), the ``obs`` columns."""
        self._writer.write_batch(record_batch(self.schema, self.obs_arrays, token_arrays, rows))

    def write_batch(self, batch: Any) -> None:
        """Append a record batch built elsewhere with :func:`record_batch` on this writer's
        ``schema`` and ``obs_arrays`` (a worker process's shard)."""
        self._writer.write_batch(batch)

    def dataset(self, description: str):
        """The written file as a memory-mapped ``datasets.Dataset`` with ``description`` (the stats JSON)."""
        import datasets

        dataset = datasets.Dataset.from_file(self.path)
        dataset.info.description = description
        return dataset


def record_batch(schema: Any, obs_arrays: dict[str, Any], token_arrays: Sequence[Any], rows: np.ndarray) -> Any:
    """One chunk's rows of the output table: the token columns, then the ``obs`` columns taken
    at ``rows``, on ``schema`` (a :class:`ChunkWriter`'s ``schema`` and ``obs_arrays``)."""
    import pyarrow as pa

    arrays = list(token_arrays) + [array.take(pa.array(rows)) for array in obs_arrays.values()]
    return pa.record_batch(arrays, schema=schema)
