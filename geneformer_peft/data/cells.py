"""Tokenized cells held for training: token ids as one flat array plus offsets.

Reading rows of a ``datasets.Dataset`` one by one converts Arrow lists to Python lists,
which dominates the step time of a small model. Here the ``input_ids`` column is read
once into a flat ``int32`` array, and each cell is a slice of it.
"""
from __future__ import annotations

import logging
import uuid
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pyarrow as pa
import torch
from torch.utils.data import Dataset

from geneformer_peft.data.collator import pad_input_ids
from geneformer_peft.errors import DataError

logger = logging.getLogger(__name__)

__all__ = ["CELL_ID_COLUMN", "EncodedCells", "StreamedCells", "collate_cells", "model_inputs"]

#: batches a StreamedCells reads before mapping its files afresh (releasing the pages read)
REMAP_EVERY_BATCHES = 32

#: dataset column holding each cell's identifier (e.g. its barcode); copied into predictions.csv
CELL_ID_COLUMN = "cell_id"


class EncodedCells(Dataset):
    """Cells of one split: ``input_ids`` slices, ``lengths`` (after ``max_length``),
    optional label ids, each cell's row number in the source dataset (``index``), when
    the dataset has a ``cell_id`` column, each cell's identifier (``cell_ids``, else ``None``),
    and for a model that reads expression values (CellFM) the values parallel to the tokens
    (``values``, else ``None``)."""

    def __init__(self, flat: np.ndarray, offsets: np.ndarray, *, labels: np.ndarray | None = None,
                 max_length: int | None = None, index: np.ndarray | None = None, name: str = "cells",
                 cell_ids: list | None = None, values: np.ndarray | None = None) -> None:
        self.flat, self.offsets = flat, offsets
        self.values = values  # float32, parallel to ``flat`` (CellFM's expression values), or None
        self.cell_ids = cell_ids
        full = np.diff(offsets)
        self.lengths = np.minimum(full, max_length) if max_length else full
        self.labels = labels
        self.index = np.arange(len(full)) if index is None else index
        self.name = name
        self.key = f"{name}#{uuid.uuid4().hex[:8]}"  # identifies these cells (e.g. in the frozen-prefix cache)
        truncated = int((full > self.lengths).sum())
        if truncated:
            logger.info("%s: %d of %d cells are longer than max_length=%d and keep their first %d genes",
                        name, truncated, len(full), max_length, max_length)

    @classmethod
    def from_dataset(cls, dataset, *, label_column: str | None = None, label2id: Mapping[Any, int] | None = None,
                     max_length: int | None = None, name: str = "cells",
                     values_column: str | None = None) -> EncodedCells:
        """Read a tokenized ``datasets.Dataset`` (``input_ids`` and, optionally, a label column).

        ``values_column`` (CellFM: ``"values"``): also read that column, one float per token
        (:attr:`values`); a dataset without it, or with another number of values than tokens in
        a cell, is a :class:`DataError`. ``None``: no values are read.
        """
        if "input_ids" not in dataset.column_names:
            raise DataError(f"{name}: no 'input_ids' column; expected a tokenized dataset, "
                            f"found columns {dataset.column_names}")
        column = dataset.data.column("input_ids")
        column = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
        offsets = column.offsets.to_numpy().astype(np.int64)
        flat = column.values.to_numpy(zero_copy_only=False).astype(np.int32, copy=False)
        token_values = None
        if values_column is not None:
            token_values = _read_values(dataset, values_column, offsets, name)
        offsets = offsets - offsets[0]
        labels = None
        if label_column is not None:
            if label_column not in dataset.column_names:
                raise DataError(f"{name}: label column {label_column!r} does not exist; "
                                f"expected one of {dataset.column_names} (set --label_column)")
            values = dataset[label_column]
            if label2id is not None:
                unknown = sorted({str(v) for v in values if v not in label2id})
                if unknown:
                    raise DataError(f"{name}: labels {unknown} of column {label_column!r} are not in the "
                                    f"model's label set {sorted(map(str, label2id))}")
                labels = np.array([label2id[v] for v in values], dtype=np.int64)
            else:
                labels = np.asarray(values, dtype=np.int64)
        cell_ids = list(dataset[CELL_ID_COLUMN]) if CELL_ID_COLUMN in dataset.column_names else None
        return cls(flat, offsets, labels=labels, max_length=max_length, name=name, cell_ids=cell_ids,
                   values=token_values)

    def __len__(self) -> int:
        return len(self.lengths)

    def subset(self, positions: Sequence[int], *, labels: np.ndarray | None = None,
               name: str | None = None) -> EncodedCells:
        """The cells at ``positions`` (their tokens, values, cell ids and row numbers), with
        ``labels`` (default: theirs)."""
        positions = np.asarray(positions, dtype=np.int64)
        starts, stops = self.offsets[positions], self.offsets[positions] + self.lengths[positions]
        parts = [self.flat[a:b] for a, b in zip(starts, stops)]
        flat = np.concatenate(parts) if parts else self.flat[:0]
        offsets = np.concatenate([[0], np.cumsum(stops - starts)]).astype(np.int64)
        values = None
        if self.values is not None:
            pieces = [self.values[a:b] for a, b in zip(starts, stops)]
            values = np.concatenate(pieces) if pieces else self.values[:0]
        if labels is None and self.labels is not None:
            labels = self.labels[positions]
        cell_ids = [self.cell_ids[i] for i in positions] if self.cell_ids is not None else None
        return EncodedCells(flat, offsets, labels=labels, index=self.index[positions], name=name or self.name,
                            cell_ids=cell_ids, values=values)

    def tokens(self, i: int) -> np.ndarray:
        start = self.offsets[i]
        return self.flat[start:start + self.lengths[i]]

    def token_values(self, i: int) -> np.ndarray:
        """Cell ``i``'s expression values (as many as :meth:`tokens`); needs :attr:`values`."""
        start = self.offsets[i]
        return self.values[start:start + self.lengths[i]]

    def __getitem__(self, i: int) -> dict:
        item = {"input_ids": self.tokens(i), "cell": i, "split": self.key}
        if self.values is not None:
            item["values"] = self.token_values(i)
        if self.labels is not None:  # one id, or one per task of a multi-task run (n_cells, n_tasks)
            item["label"] = int(self.labels[i]) if self.labels.ndim == 1 else self.labels[i].tolist()
        return item

    def items(self, positions: Sequence[int]) -> list[dict]:
        """The items of the cells at ``positions`` (one batch)."""
        return [self[i] for i in positions]


class StreamedCells:
    """Cells of a saved ``datasets.Dataset`` whose tokens are read one batch at a time.

    Like :class:`EncodedCells` (``lengths``, ``labels``, ``index``, ``items``) but the
    ``input_ids`` are never all in memory: each :meth:`items` call takes its rows from the
    dataset's memory-mapped Arrow files, and the files are mapped afresh every
    ``remap_every`` batches (default :data:`REMAP_EVERY_BATCHES`), so the pages read so far are released and the resident
    memory stays bounded by a few batches whatever the number of cells. A dataset that is
    not backed by its own files (in memory, or a ``select``-ed view) is read from its table
    as it is.
    """

    def __init__(self, dataset, *, labels: np.ndarray | None = None, max_length: int | None = None,
                 name: str = "cells", remap_every: int | None = None) -> None:
        import pyarrow.compute as pc

        if "input_ids" not in dataset.column_names:
            raise DataError(f"{name}: no 'input_ids' column; expected a tokenized dataset, "
                            f"found columns {dataset.column_names}")
        self._dataset = dataset
        full = pc.list_value_length(dataset.data.column("input_ids")).to_numpy(zero_copy_only=False)
        full = full.astype(np.int64)
        self.full_lengths = full  # before max_length
        self.lengths = np.minimum(full, max_length) if max_length else full
        self.max_length = max_length
        self.labels = labels
        self.index = np.arange(len(full))
        self.name = name
        self.key = f"{name}#{uuid.uuid4().hex[:8]}"
        files = [f.get("filename") for f in (getattr(dataset, "cache_files", None) or [])]
        self._files = files if files and all(files) and getattr(dataset, "_indices", None) is None else None
        self._remap_every = remap_every or REMAP_EVERY_BATCHES
        self._column = None
        self._reads = 0
        truncated = int((full > self.lengths).sum())
        if truncated:
            logger.info("%s: %d of %d cells are longer than max_length=%d and keep their first %d genes",
                        name, truncated, len(full), max_length, max_length)

    def __len__(self) -> int:
        return len(self.lengths)

    def _input_ids(self):
        if self._files is None:
            return self._dataset.data.column("input_ids")
        if self._column is None or self._reads >= self._remap_every:
            self._column = None  # drop the old mapping before making the new one
            chunks = []
            for filename in self._files:
                table = pa.ipc.open_stream(pa.memory_map(filename)).read_all()
                chunks += table.column("input_ids").chunks
            column = pa.chunked_array(chunks, type=self._dataset.data.column("input_ids").type)
            if len(column) != len(self.lengths):
                raise DataError(f"{self.name}: its Arrow files hold {len(column)} cells, the dataset "
                                f"{len(self.lengths)}; expected the files of this dataset")
            self._column, self._reads = column, 0
        self._reads += 1
        return self._column

    def items(self, positions: Sequence[int]) -> list[dict]:
        """The items (``input_ids`` truncated to ``max_length``, ``cell``, ``split``,
        ``label``) of the cells at ``positions``, in that order."""
        positions = np.asarray(positions, dtype=np.int64)
        part = self._input_ids().take(pa.array(positions))
        part = part.combine_chunks() if isinstance(part, pa.ChunkedArray) else part
        offsets = part.offsets.to_numpy().astype(np.int64)
        values = part.values.to_numpy(zero_copy_only=False)
        out = []
        for k, i in enumerate(positions):
            item = {"input_ids": values[offsets[k]:offsets[k] + self.lengths[i]].astype(np.int32),
                    "cell": int(i), "split": self.key}
            if self.labels is not None:
                item["label"] = int(self.labels[i])
            out.append(item)
        return out


def _read_values(dataset, column_name: str, token_offsets: np.ndarray, name: str) -> np.ndarray:
    """The flat float32 values of ``column_name``, checked to be parallel to ``input_ids``."""
    if column_name not in dataset.column_names:
        raise DataError(f"{name}: no {column_name!r} column; the model reads each gene's expression value beside its "
                        f"id (found columns {dataset.column_names}); tokenize the raw counts with "
                        "`geneformer-peft tokenize --encoding cellfm`")
    column = dataset.data.column(column_name)
    column = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    offsets = column.offsets.to_numpy().astype(np.int64)
    if not np.array_equal(np.diff(offsets), np.diff(token_offsets)):
        row = int(np.flatnonzero(np.diff(offsets) != np.diff(token_offsets))[0])
        raise DataError(f"{name}: row {row} has {int(offsets[row + 1] - offsets[row])} {column_name!r} for "
                        f"{int(token_offsets[row + 1] - token_offsets[row])} input_ids; expected one value per "
                        "gene token")
    values = column.values.to_numpy(zero_copy_only=False).astype(np.float32, copy=False)
    values = values[offsets[0]:offsets[-1]] if len(offsets) else values[:0]
    if not np.isfinite(values).all():
        raise DataError(f"{name}: column {column_name!r} holds a value that is not finite "
                        f"({values[~np.isfinite(values)][0]!r}); expected log1p expression values")
    return values


def model_inputs(batch: Mapping[str, Any], device: torch.device) -> tuple[torch.Tensor, ...]:
    """The positional inputs of a classifier for ``batch`` on ``device``: ``(input_ids,
    attention_mask)``, or ``(input_ids, values, attention_mask)`` when the batch carries
    expression values (CellFM)."""
    input_ids = batch["input_ids"].to(device, non_blocking=True)
    attention_mask = batch["attention_mask"].to(device, non_blocking=True)
    if "values" in batch:
        return input_ids, batch["values"].to(device, non_blocking=True), attention_mask
    return input_ids, attention_mask


def collate_cells(items: Sequence[dict], *, pad_token_id: int = 0, pad_to_multiple_of: int | None = None) -> dict:
    """Pad to the longest cell of the batch (optionally to a multiple): ``input_ids``,
    ``attention_mask`` (1 genes, 0 padding), ``values`` (float32, 0 at padding) when the
    cells carry them, ``labels`` when known, ``cells`` (positions) and ``split`` (whose
    cells they are)."""
    batch = pad_input_ids([it["input_ids"] for it in items], pad_token_id=pad_token_id,
                          pad_to_multiple_of=pad_to_multiple_of)
    if "values" in items[0]:
        values = np.zeros(tuple(batch["input_ids"].shape), dtype=np.float32)
        for row, item in enumerate(items):
            values[row, :len(item["values"])] = item["values"]
        batch["values"] = torch.from_numpy(values)
    batch["cells"] = torch.tensor([it["cell"] for it in items])
    batch["split"] = items[0]["split"]
    if "label" in items[0]:
        batch["labels"] = torch.tensor([it["label"] for it in items], dtype=torch.long)
    return batch
