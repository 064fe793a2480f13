"""Tokenized cells read for analysis: a selection of rows of a saved dataset, read in windows.

Only the lengths (one integer per cell) are read up front; token ids are read from the
memory-mapped Arrow table a window of cells at a time, so the memory an analysis holds does
not grow with the number of cells. Cells longer than the model takes keep their first
``max_length`` tokens, as the classifier saw them; a V2 cell cut this way loses its
``<eos>`` (the special-token check is per cell, so that is handled).
"""
from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from geneformer_peft.data.filters import parse_column_values
from geneformer_peft.errors import DataError

__all__ = ["TokenizedCells", "length_grouped_batches", "parse_filters"]

logger = logging.getLogger(__name__)


def parse_filters(filters: Sequence[str] | None) -> list[tuple[str, set[str]]]:
    """``["cell_type=T cell,B cell", 'batch="b1, 2"']`` -> ``[("cell_type", {"T cell", "B cell"}), ("batch",
    {"b1, 2"})]`` (:func:`~geneformer_peft.data.filters.parse_column_values`: a value holding a comma
    is written in double quotes).

    Raises
    ------
    DataError
        For an entry without ``=`` or with unbalanced quotes.
    """
    parsed = []
    for item in filters or ():
        column, values = parse_column_values(item, flag="--filter")
        parsed.append((column, set(values)))
    return parsed


class TokenizedCells:
    """Rows ``rows`` of a tokenized ``datasets.Dataset`` (``input_ids`` column).

    Parameters
    ----------
    dataset : datasets.Dataset
        Tokenized cells.
    rows : array of int, optional
        Row numbers to use, in this order (default all).
    max_length : int, optional
        Tokens kept per cell (the model's input size).
    name : str
        Names the input in messages.
    """

    def __init__(self, dataset, rows: np.ndarray | None = None, *, max_length: int | None = None,
                 name: str = "input") -> None:
        if "input_ids" not in dataset.column_names:
            raise DataError(f"{name}: no 'input_ids' column; expected a tokenized dataset, "
                            f"found columns {dataset.column_names}")
        if getattr(dataset, "_indices", None) is not None:
            dataset = dataset.flatten_indices()
        self.dataset = dataset
        self.name = name
        self._column = dataset.data.column("input_ids")
        all_lengths = pc.list_value_length(self._column).to_numpy(zero_copy_only=False).astype(np.int64)
        self.rows = np.arange(len(all_lengths)) if rows is None else np.asarray(rows, dtype=np.int64)
        full = all_lengths[self.rows]
        self.lengths = np.minimum(full, max_length) if max_length else full
        self.max_length = max_length
        cut = int((full > self.lengths).sum())
        if cut:
            logger.info("%s: %d of %d cells are longer than the model's %d tokens and keep their first %d",
                        name, cut, len(full), max_length, max_length)
        if len(self.rows) and int(self.lengths.min()) == 0:
            empty = self.rows[self.lengths == 0][:5].tolist()
            raise DataError(f"{name}: rows {empty} have no tokens; expected every cell to hold genes")

    def __len__(self) -> int:
        return len(self.rows)

    def beyond_input(self, tokens: Sequence[int]) -> dict[int, int]:
        """Token -> cells of this selection that hold it only beyond the first ``max_length``
        tokens (expressed, but cut from what the model reads)."""
        if not self.max_length or not len(self.rows) or not len(tokens):
            return {}
        part = self._column.take(pa.array(self.rows))
        part = part.combine_chunks() if isinstance(part, pa.ChunkedArray) else part
        tail = pc.list_slice(part, self.max_length)
        values = pc.list_flatten(tail).to_numpy(zero_copy_only=False).astype(np.int64)
        parents = pc.list_parent_indices(tail).to_numpy(zero_copy_only=False)
        return {int(t): int(np.unique(parents[values == int(t)]).size) for t in tokens}

    def subset(self, positions: np.ndarray) -> TokenizedCells:
        """The cells at ``positions`` of this selection."""
        out = object.__new__(TokenizedCells)
        out.__dict__.update(self.__dict__)
        out.rows = self.rows[positions]
        out.lengths = self.lengths[positions]
        return out

    def tokens(self, positions: Sequence[int] | np.ndarray) -> list[np.ndarray]:
        """Token arrays (int64, truncated) of the cells at ``positions`` of this selection."""
        positions = np.asarray(positions, dtype=np.int64)
        if positions.size == 0:
            return []
        part = self._column.take(pa.array(self.rows[positions]))
        part = part.combine_chunks() if isinstance(part, pa.ChunkedArray) else part
        values = part.flatten().to_numpy(zero_copy_only=False).astype(np.int64)
        lens = pc.list_value_length(part).to_numpy(zero_copy_only=False).astype(np.int64)
        starts = np.concatenate([[0], np.cumsum(lens)])
        out = []
        for i in range(len(positions)):
            start = starts[i]
            stop = min(starts[i + 1], start + self.max_length) if self.max_length else starts[i + 1]
            out.append(values[start:stop])
        return out

    def token_values(self, positions: Sequence[int] | np.ndarray, column: str = "values") -> list[np.ndarray]:
        """The expression values (float32, parallel to :meth:`tokens`, truncated alike) of the cells at
        ``positions``: CellFM's ``values`` column."""
        if column not in self.dataset.column_names:
            raise DataError(f"{self.name}: no {column!r} column; the model reads each gene's expression value "
                            f"beside its id (found columns {self.dataset.column_names}); tokenize the raw counts "
                            "with `geneformer-peft tokenize --encoding cellfm`")
        positions = np.asarray(positions, dtype=np.int64)
        if positions.size == 0:
            return []
        part = self.dataset.data.column(column).take(pa.array(self.rows[positions]))
        part = part.combine_chunks() if isinstance(part, pa.ChunkedArray) else part
        values = part.flatten().to_numpy(zero_copy_only=False).astype(np.float32)
        lens = pc.list_value_length(part).to_numpy(zero_copy_only=False).astype(np.int64)
        starts = np.concatenate([[0], np.cumsum(lens)])
        return [values[starts[i]:starts[i] + n] for i, n in enumerate(self.lengths[positions])]

    def column(self, name: str) -> np.ndarray:
        """Values of a non-token column for the selected cells."""
        if name not in self.dataset.column_names:
            raise DataError(f"{self.name}: column {name!r} does not exist; expected one of "
                            f"{[c for c in self.dataset.column_names if c != 'input_ids']}")
        values = self.dataset.data.column(name).to_numpy(zero_copy_only=False)
        return values[self.rows]

    def obs(self) -> pd.DataFrame:
        """Every column except ``input_ids`` for the selected cells (index: the input row
        number as a string, column ``input_row``). Columns holding lists or other non-scalar
        values are left out, with a log message (they have no place in ``obs``)."""
        frame = pd.DataFrame(index=pd.Index([str(r) for r in self.rows], name="cell"))
        frame["input_row"] = self.rows
        for name in self.dataset.column_names:
            if name == "input_ids":
                continue
            field_type = self.dataset.data.schema.field(name).type
            if pa.types.is_nested(field_type):
                logger.info("%s: column %r holds %s values; left out of obs", self.name, name, field_type)
                continue
            frame[name] = self.column(name)
        return frame


def length_grouped_batches(lengths: np.ndarray, batch_size: int, *, window: int | None = None
                           ) -> Iterator[np.ndarray]:
    """Positions ``0..n-1`` in batches of similar length.

    Within consecutive windows of ``window`` positions (default ``64 * batch_size``) the
    positions are sorted by length, longest first, and cut into batches of ``batch_size``:
    little padding, and a caller reading tokens per window holds one window at a time.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size {batch_size} must be >= 1")
    n = len(lengths)
    window = window or 64 * batch_size
    for start in range(0, n, window):
        idx = np.arange(start, min(start + window, n))
        idx = idx[np.argsort(-lengths[idx], kind="stable")]
        for b in range(0, len(idx), batch_size):
            yield idx[b:b + batch_size]
