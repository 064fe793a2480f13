"""Cell and gene embeddings of tokenized cells (what Geneformer's EmbExtractor computes).

Modes (``emb_layer`` as in :mod:`.layers`: 0 the last layer, -1 the second-to-last ...):

- ``cell``: per cell, the mean of the layer's hidden states over the cell's gene tokens
  (padding and V2's ``<cls>`` / ``<eos>`` excluded);
- ``cls``: per cell, the hidden state at position 0, which must be ``<cls>`` (V2 inputs);
- ``gene``: per gene, the mean of its contextual embedding over the cells that express it
  (each such cell contributes its one vector; sums in float64, so the mean is exact to
  float64 rounding), with the number of cells, and optionally per value of a label column.

Cells run longest first in batches of similar length, only the layers up to ``emb_layer``
run (:class:`.layers.LayerReader`), results come back in the input order. Outputs:
AnnData ``.h5ad`` (``obsm["X_geneformer"]`` for cells, ``X`` over genes for genes),
or a ``.csv`` / ``.parquet`` table.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from geneformer_peft.analysis.cells import TokenizedCells, length_grouped_batches
from geneformer_peft.analysis.layers import LayerReader
from geneformer_peft.analysis.loading import SpecialTokens
from geneformer_peft.data.collator import pad_input_ids
from geneformer_peft.errors import DataError
from geneformer_peft.files import atomic_file
from geneformer_peft.models.device import autocast

__all__ = ["EMB_MODES", "OBSM_KEY", "CellEmbeddings", "GeneEmbeddings", "analysis_version", "check_cls_inputs",
           "embed_cell_batches", "embed_cells", "embed_genes", "forward_with_values", "gene_token_mask", "make_batch",
           "pool_cells", "resolve_precision", "values_column_of",
           "write_cell_embeddings",
           "write_gene_embeddings"]

logger = logging.getLogger(__name__)

EMB_MODES = ("cell", "cls", "gene")
OBSM_KEY = "X_geneformer"


def analysis_version() -> str:
    """The installed geneformer-peft version (``"unknown"`` when not installed)."""
    try:
        import importlib.metadata as md

        return md.version("geneformer-peft")
    except Exception:  # noqa: BLE001 - a source checkout that was never installed
        return "unknown"


def resolve_precision(precision: str, device: torch.device) -> str:
    """``auto`` -> ``bf16`` on CUDA, ``fp32`` elsewhere; other values pass through."""
    if precision == "auto":
        return "bf16" if device.type == "cuda" else "fp32"
    if precision not in ("fp32", "bf16", "fp16"):
        raise ValueError(f"precision {precision!r}; expected auto, fp32, bf16 or fp16")
    return precision


def make_batch(token_lists: list[np.ndarray], specials: SpecialTokens, device: torch.device
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded ``input_ids``, ``attention_mask`` and the (B, L) bool mask of gene tokens."""
    batch = pad_input_ids(token_lists, pad_token_id=specials.pad)
    input_ids = batch["input_ids"].to(device, non_blocking=True)
    attention_mask = batch["attention_mask"].to(device, non_blocking=True)
    return input_ids, attention_mask, gene_token_mask(token_lists, specials, input_ids.shape[1]).to(device)


def gene_token_mask(token_lists: list[np.ndarray], specials: SpecialTokens, width: int) -> torch.Tensor:
    """(B, width) bool: True at each cell's gene tokens (no padding, no ``<cls>`` / ``<eos>``)."""
    mask = torch.zeros(len(token_lists), width, dtype=torch.bool)
    for row, tokens in enumerate(token_lists):
        start, stop = specials.gene_span(tokens)
        mask[row, start:stop] = True
    return mask


def pool_cells(hidden: torch.Tensor, gene_mask: torch.Tensor, mode: str) -> torch.Tensor:
    """(B, d) float32 cell embeddings from (B, L, d) hidden states: mean over gene tokens
    (``cell``) or position 0 (``cls``)."""
    if mode == "cls":
        return hidden[:, 0].float()
    weights = gene_mask.to(torch.float32)
    counts = weights.sum(dim=1, keepdim=True)
    if bool((counts == 0).any()):
        raise DataError("a cell has no gene tokens (only special tokens); expected at least one gene per cell")
    return torch.bmm(weights.unsqueeze(1), hidden.float()).squeeze(1) / counts


def check_cls_inputs(cells: TokenizedCells, specials: SpecialTokens, *, source: str = "the token dictionary") -> None:
    """``cls`` mode needs every cell to start with ``<cls>``: a clear error otherwise."""
    if specials.cls is None:
        raise DataError(f"--emb_mode cls needs V2 inputs that start with a <cls> token, but {source} has no "
                        "<cls> (a V1 vocabulary); use --emb_mode cell (the mean over gene tokens)")
    for start in range(0, len(cells), 4096):
        positions = np.arange(start, min(start + 4096, len(cells)))
        firsts = np.array([t[0] for t in cells.tokens(positions)])
        bad = np.flatnonzero(firsts != specials.cls)
        if bad.size:
            rows = cells.rows[positions[bad[:5]]].tolist()
            raise DataError(f"--emb_mode cls: input rows {rows} do not start with <cls> (id {specials.cls}); their "
                            f"first tokens are {firsts[bad[:5]].tolist()}. Tokenize the cells as V2 "
                            "(model_version V2) or use --emb_mode cell")


@dataclass
class CellEmbeddings:
    """One embedding per cell, in the order of the selected cells."""

    embeddings: np.ndarray  # (n_cells, d) float32
    obs: pd.DataFrame
    info: dict[str, Any] = field(default_factory=dict)


@dataclass
class GeneEmbeddings:
    """One mean embedding per gene (over the cells expressing it), optionally per label."""

    tokens: np.ndarray  # (G,) token ids, ascending
    gene_ids: list[str]
    means: np.ndarray  # (G, d) float32
    counts: np.ndarray  # (G,) cells expressing each gene
    label_names: list[str] | None = None
    label_means: np.ndarray | None = None  # (K, G, d) float32, NaN where no cell of the label has the gene
    label_counts: np.ndarray | None = None  # (K, G)
    info: dict[str, Any] = field(default_factory=dict)


def _setup(model, device, precision, emb_layer):
    dev = torch.device(device) if not isinstance(device, torch.device) else device
    prec = resolve_precision(precision, dev)
    model.to(dev).eval()
    return dev, prec, LayerReader(model, emb_layer)


def embed_cells(model, cells: TokenizedCells, *, specials: SpecialTokens, mode: str = "cell", emb_layer: int = -1,
                batch_size: int = 64, device: str | torch.device = "cpu", precision: str = "auto",
                progress: bool = False) -> np.ndarray:
    """(n_cells, d) float32 cell embeddings (``mode`` ``cell`` or ``cls``), in the order of ``cells``.

    Raises
    ------
    DataError
        For ``cls`` on inputs without ``<cls>``.
    """
    positions, emb = embed_cell_batches(model, cells, specials=specials, mode=mode, emb_layer=emb_layer,
                                        batch_size=batch_size, device=device, precision=precision, progress=progress)
    out = np.zeros((len(cells), emb.shape[1]), dtype=np.float32)
    out[positions] = emb
    return out


@torch.no_grad()
def embed_cell_batches(model, cells: TokenizedCells, *, specials: SpecialTokens, mode: str = "cell",
                       emb_layer: int = -1, batch_size: int = 64, device: str | torch.device = "cpu",
                       precision: str = "auto", progress: bool = False,
                       shard: tuple[int, int] = (0, 1)) -> tuple[np.ndarray, np.ndarray]:
    """The embeddings of the length-grouped batches numbered ``rank, rank + world, ...`` for
    ``shard=(rank, world)`` (all of them by default): ``(positions, embeddings)``.

    The batches are those of one process whatever the shard, so each cell's embedding is
    computed in the same batch as without sharding (see :func:`embed_cells`).
    """
    if mode not in ("cell", "cls"):
        raise ValueError(f"mode {mode!r}; expected 'cell' or 'cls' (gene embeddings: embed_genes)")
    values_column = values_column_of(model)
    if values_column is not None:  # CellFM: ids and values, the model's own cls in front
        if shard[1] > 1:
            raise DataError("CellFM embeddings run in one process; start embed without torchrun")
        emb = _embed_cells_with_values(model, cells, values_column, mode=mode, emb_layer=emb_layer,
                                       batch_size=batch_size, device=device, precision=precision, progress=progress)
        return np.arange(len(cells)), emb
    if mode == "cls":
        check_cls_inputs(cells, specials)
    dev, prec, reader = _setup(model, device, precision, emb_layer)
    rank, world = shard
    mine = [idx for k, idx in enumerate(length_grouped_batches(cells.lengths, batch_size)) if k % world == rank]
    positions = np.concatenate(mine) if mine else np.zeros(0, dtype=np.int64)
    out = np.zeros((len(positions), model.config.hidden_size), dtype=np.float32)
    start = 0
    for idx in tqdm(mine, desc=f"embed ({mode})", disable=None if progress else True, leave=False):
        token_lists = cells.tokens(idx)
        input_ids, attention_mask, genes = make_batch(token_lists, specials, dev)
        with autocast(dev, prec):
            hidden, _ = reader(input_ids, attention_mask)
        out[start:start + len(idx)] = pool_cells(hidden, genes, mode).cpu().numpy()
        start += len(idx)
    return positions, out


def values_column_of(model) -> str | None:
    """The dataset column of expression values ``model``'s family reads (CellFM), else ``None``."""
    from geneformer_peft.models.families import family_of_config

    return family_of_config(model.config).values_column


@torch.no_grad()
def _embed_cells_with_values(model, cells: TokenizedCells, values_column: str, *, mode: str, emb_layer: int,
                             batch_size: int, device, precision: str, progress: bool) -> np.ndarray:
    """:func:`embed_cells` for a model that reads values beside the ids and puts its own cls at
    position 0 (CellFM): ``cls`` is that position, ``cell`` the mean over the gene positions."""
    from geneformer_peft.analysis.layers import resolve_emb_layer

    dev = torch.device(device) if not isinstance(device, torch.device) else device
    prec = resolve_precision(precision, dev)
    model.to(dev).eval()
    index = resolve_emb_layer(emb_layer, int(model.config.num_hidden_layers))
    out = np.zeros((len(cells), model.config.hidden_size), dtype=np.float32)
    total = -(-len(cells) // batch_size)
    for idx in tqdm(length_grouped_batches(cells.lengths, batch_size), total=total, desc=f"embed ({mode})",
                    disable=None if progress else True, leave=False):
        _, pooled, _ = forward_with_values(model, cells.tokens(idx), cells.token_values(idx, values_column),
                                           layer_index=index, mode=mode, device=dev, precision=prec)
        out[idx] = pooled.cpu().numpy()
    return out


@torch.no_grad()
def forward_with_values(model, token_lists: list[np.ndarray], value_lists: list[np.ndarray], *, layer_index: int,
                        mode: str, device: torch.device, precision: str):
    """One forward of a model that reads values beside the ids (CellFM) on right-padded cells.

    Returns
    -------
    (torch.Tensor, torch.Tensor, torch.Tensor or None)
        The (B, 1 + L, d) hidden states of ``hidden_states[layer_index]`` (position 0 the cls),
        the (B, d) float32 cell embeddings (``cls``: position 0; ``cell``: the mean over the gene
        positions) and a classifier's (B, C) logits (``None`` for another model).
    """
    batch = pad_input_ids(token_lists, pad_token_id=int(model.config.pad_token_id))
    values = np.zeros(tuple(batch["input_ids"].shape), dtype=np.float32)
    for row, cell_values in enumerate(value_lists):
        values[row, :len(cell_values)] = cell_values
    mask = batch["attention_mask"].to(device)
    with autocast(device, precision):
        out = model(batch["input_ids"].to(device), torch.from_numpy(values).to(device), mask,
                    output_hidden_states=True)
    hidden = out.hidden_states[layer_index]
    if mode == "cls":
        pooled = hidden[:, 0].float()
    else:
        weights = mask.to(torch.float32).unsqueeze(1)  # (B, 1, L): the gene positions 1..L
        pooled = torch.bmm(weights, hidden[:, 1:].float()).squeeze(1) / weights.sum(dim=2)
    logits = out.logits if hasattr(model, "classifier") else None
    return hidden, pooled, logits


@torch.no_grad()
def embed_genes(model, cells: TokenizedCells, *, specials: SpecialTokens, emb_layer: int = -1,
                labels: np.ndarray | None = None, batch_size: int = 64, device: str | torch.device = "cpu",
                precision: str = "auto", token_to_gene: dict[int, str] | None = None,
                progress: bool = False) -> GeneEmbeddings:
    """Per-gene mean contextual embeddings over the cells expressing each gene.

    Parameters
    ----------
    labels : array, optional
        One label per cell: also return the means per label.
    token_to_gene : dict, optional
        Token id -> gene id (default: ``"token_<id>"``).
    """
    dev, prec, reader = _setup(model, device, precision, emb_layer)
    d = model.config.hidden_size
    vocab = model.config.vocab_size
    label_names = label_codes = None
    if labels is not None:
        label_names, label_codes = np.unique(np.asarray(labels).astype(str), return_inverse=True)
        label_names = label_names.tolist()
    groups = 1 + (len(label_names) if label_names else 0)
    # rows of the accumulators: group * vocab + token (group 0: all cells; 1 + k: label k)
    sums = torch.zeros(groups * vocab, d, dtype=torch.float64, device=dev)
    counts = torch.zeros(groups * vocab, dtype=torch.float64, device=dev)
    total = -(-len(cells) // batch_size)
    for idx in tqdm(length_grouped_batches(cells.lengths, batch_size), total=total, desc="embed (gene)",
                    disable=None if progress else True, leave=False):
        token_lists = cells.tokens(idx)
        input_ids, attention_mask, genes = make_batch(token_lists, specials, dev)
        with autocast(dev, prec):
            hidden, _ = reader(input_ids, attention_mask)
        vectors = hidden[genes].double()  # (N, d) every gene token of the batch
        tokens = input_ids[genes]
        if bool((tokens >= vocab).any()):
            raise DataError(f"token ids up to {int(tokens.max())} exceed the model's vocab_size {vocab}")
        sums.index_add_(0, tokens, vectors)
        counts.index_add_(0, tokens, torch.ones_like(tokens, dtype=torch.float64))
        if label_codes is not None:
            per_row = torch.as_tensor(label_codes[idx], device=dev)[:, None].expand_as(input_ids)[genes]
            keys = (1 + per_row) * vocab + tokens
            sums.index_add_(0, keys, vectors)
            counts.index_add_(0, keys, torch.ones_like(keys, dtype=torch.float64))
    sums, counts = sums.view(groups, vocab, d).cpu().numpy(), counts.view(groups, vocab).cpu().numpy()
    present = np.flatnonzero(counts[0] > 0)
    with np.errstate(invalid="ignore", divide="ignore"):
        means = (sums[:, present] / counts[:, present, None]).astype(np.float32)  # NaN where count 0
    names = [token_to_gene.get(int(t), f"token_{int(t)}") if token_to_gene else f"token_{int(t)}" for t in present]
    return GeneEmbeddings(tokens=present, gene_ids=names, means=means[0], counts=counts[0, present].astype(np.int64),
                          label_names=label_names,
                          label_means=means[1:] if label_names else None,
                          label_counts=counts[1:, present].astype(np.int64) if label_names else None)


# ----------------------------------------------------------------------------- writing
def _table_format(path: Path) -> str:
    suffix = path.suffix.lower()
    if suffix not in (".h5ad", ".csv", ".parquet"):
        raise DataError(f"--output {path}: unknown format {suffix!r}; expected .h5ad (AnnData), .csv or .parquet")
    return suffix[1:]


def _uns_safe(info: dict[str, Any]) -> dict[str, Any]:
    """h5ad cannot store None; lists and scalars pass."""
    return {k: ("" if v is None else (str(v) if isinstance(v, Path) else v)) for k, v in info.items()}


def _write_table(frame: pd.DataFrame, path: Path, fmt: str) -> None:
    with atomic_file(path, suffix=path.suffix) as tmp:
        if fmt == "csv":
            frame.to_csv(tmp, index=False)
        else:
            frame.to_parquet(tmp, index=False)


def _write_h5ad(adata, path: Path) -> None:
    """Write ``adata`` as ``.h5ad``: built in memory, then written as plain bytes, because h5py
    crashes the process (segfault) when a write to a full disk or past ``ulimit -f`` fails; this
    way such a failure is an ordinary OSError naming the file."""
    import io

    import anndata
    import h5py

    buffer = io.BytesIO()
    with h5py.File(buffer, "w") as handle:
        anndata.io.write_elem(handle, "/", adata)
    with atomic_file(path, suffix=".h5ad") as tmp, open(tmp, "wb") as out:
        out.write(buffer.getbuffer())


def write_cell_embeddings(result: CellEmbeddings, path: str | Path) -> Path:
    """Write cell embeddings: AnnData (``obsm["X_geneformer"]``, ``obs``, ``uns["geneformer_peft"]``)
    for ``.h5ad``; for ``.csv`` / ``.parquet`` the obs columns then ``emb_0`` ... ``emb_{d-1}``."""
    path = Path(path)
    fmt = _table_format(path)
    if fmt == "h5ad":
        import anndata

        obs = result.obs.copy()
        for name in obs.columns:  # h5ad stores strings, numbers, booleans and categoricals
            if obs[name].dtype == object:
                obs[name] = obs[name].astype(str)
        adata = anndata.AnnData(obs=obs, obsm={OBSM_KEY: result.embeddings})
        adata.uns["geneformer_peft"] = _uns_safe(result.info)
        _write_h5ad(adata, path)
    else:
        emb = pd.DataFrame(result.embeddings, columns=[f"emb_{i}" for i in range(result.embeddings.shape[1])])
        _write_table(pd.concat([result.obs.reset_index(drop=True), emb], axis=1), path, fmt)
    return path


def _layer_key(label: str) -> str:
    return "label=" + str(label).replace("/", "_")


def write_gene_embeddings(result: GeneEmbeddings, path: str | Path) -> Path:
    """Write gene embeddings: AnnData with genes as observations (``X`` the means, ``obs``
    ``token_id`` / ``n_cells`` and ``n_cells_<label>``, ``layers["label=<label>"]`` the
    per-label means, NaN where no cell of the label has the gene); ``.csv`` / ``.parquet``:
    one row per gene and label (``label`` ``"all"`` for every cell)."""
    path = Path(path)
    fmt = _table_format(path)
    obs = pd.DataFrame({"token_id": result.tokens.astype(np.int64), "n_cells": result.counts},
                       index=pd.Index(result.gene_ids, name="gene"))
    if fmt == "h5ad":
        import anndata

        layers = {}
        if result.label_names:
            for k, name in enumerate(result.label_names):
                obs[f"n_cells_{name}"] = result.label_counts[k]
                layers[_layer_key(name)] = result.label_means[k]
        adata = anndata.AnnData(X=result.means, obs=obs, layers=layers or None)
        adata.uns["geneformer_peft"] = _uns_safe({**result.info, "labels": list(result.label_names or [])})
        _write_h5ad(adata, path)
        return path
    blocks = [("all", result.counts, result.means)]
    for k, name in enumerate(result.label_names or []):
        blocks.append((name, result.label_counts[k], result.label_means[k]))
    frames = []
    for label, counts, means in blocks:
        keep = counts > 0
        head = pd.DataFrame({"gene": np.asarray(result.gene_ids)[keep], "token_id": result.tokens[keep],
                             "label": label, "n_cells": counts[keep]})
        emb = pd.DataFrame(means[keep], columns=[f"emb_{i}" for i in range(means.shape[1])])
        frames.append(pd.concat([head, emb], axis=1))
    _write_table(pd.concat(frames, ignore_index=True), path, fmt)
    return path
