"""In silico perturbation of tokenized cells (what Geneformer's InSilicoPerturber does).

Perturbations act on a cell's rank value encoding, its gene tokens ordered by normalised
expression, highest first (V2's ``<cls>`` stays first and ``<eos>`` last; neither is ever
moved or counted as a gene). With ``n`` the cell's number of gene tokens and ``p`` the
0-based rank of a perturbed gene among them:

- ``delete``: the gene's token is removed (the cell has ``n - 1`` genes);
- ``overexpress``: the gene moves to rank 0 (the first gene position, after ``<cls>`` when
  present). A gene the cell does not express is inserted there, and if the cell then has
  more tokens than the model takes, its last (lowest-ranked) gene is dropped;
- ``inhibit``: the gene moves down by ``s = max(1, round(rank_shift * n))`` ranks, to rank
  ``min(p + s, n - 1)``;
- ``activate``: the gene moves up by ``s`` ranks, to rank ``max(p - s, 0)``.

The other genes keep their relative order. With ``combination`` the listed genes are
perturbed together: every one the cell has is removed / moved (inhibit and activate
compute each gene's target rank from its original rank; genes landing at the same place
keep their original order; overexpressed genes take the first ranks in the listed order).
For ``delete``, ``inhibit`` and ``activate``, a gene a cell does not express is skipped for
that cell and counted (``n_cells_absent`` in the statistics and in ``summary.json``); a
gene absent from every cell is reported, not an error.

Measures per perturbed cell, all at ``emb_layer`` (:mod:`.layers`):

- ``cosine_sim``: cosine similarity of the cell embedding (``cell``: mean over gene tokens;
  ``cls``: the ``<cls>`` position) before and after the perturbation;
- ``cell_and_gene``: also, for every other gene of the cell, the cosine similarity of its
  contextual embedding before and after (averaged per perturbed gene and affected gene
  over cells in ``gene_shifts.csv``);
- with cell states (``{"state_key": ..., "start_state": ..., "goal_state": ...,
  "alt_states": [...]}``): only start-state cells are perturbed, and ``shift_to_<state>``
  is ``cos(after, mean_state) - cos(before, mean_state)`` for the goal and each
  alternative state, ``mean_state`` the mean cell embedding of the input's cells in that
  state (its first ``max_state_cells`` cells in input order; positive: the perturbation moved
  the cell toward that state);
- on a fine-tuned classifier, ``prob_delta_<class>``: the change of each class's predicted
  probability (the full model then runs, since the head needs every layer).

Null: with a list of genes, each cell is also perturbed at ``n_null`` random genes it
expresses (not in the list; random sets of the same size with ``combination``), flagged
``is_null``; with ``genes="all"`` every expressed gene is perturbed anyway and ``n_null``
of them per cell are drawn as that cell's null sample (``null_sample``). The draws are a
function of ``seed`` and the cell's input row, so a resumed scan draws the same.

Execution: cells are processed in chunks of ``chunk_cells``; within a chunk all
perturbations of all cells are sorted by length and run in batches (all single-gene
deletions of one cell have one length), only the layers the measures need run. Each
chunk's results are written to ``chunks/`` atomically; a scan started again with the same
settings skips the chunks already written.
"""
from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from geneformer_peft.analysis.cells import TokenizedCells, length_grouped_batches
from geneformer_peft.analysis.embeddings import (
    check_cls_inputs,
    embed_cells,
    forward_with_values,
    make_batch,
    pool_cells,
    resolve_precision,
    values_column_of,
)
from geneformer_peft.analysis.layers import LayerReader, resolve_emb_layer
from geneformer_peft.analysis.loading import AnalysisModel, SpecialTokens
from geneformer_peft.errors import DataError
from geneformer_peft.files import atomic_file, write_json
from geneformer_peft.models.device import autocast
from geneformer_peft.evaluation.tasks import class_probabilities
from geneformer_peft.training.provenance import SettingsChanged

__all__ = ["PERTURB_EMB_MODES", "PERTURB_TYPES", "CellStates", "PerturbationScan", "PerturbationSettings",
           "parse_cell_states", "perturb_genes", "perturbed_length"]

logger = logging.getLogger(__name__)

PERTURB_TYPES = ("delete", "overexpress", "inhibit", "activate")
PERTURB_EMB_MODES = ("cell", "cls", "cell_and_gene")
CHUNK_DIR = "chunks"
COMBINATION = -1  # key of "the whole combination" in the absence counts
SCAN_FILE = "scan.json"


# ----------------------------------------------------------------------------- the perturbations
def rank_steps(n_genes: int, rank_shift: float) -> int:
    """Ranks an ``inhibit`` / ``activate`` moves a gene: ``max(1, round(rank_shift * n_genes))``."""
    return max(1, int(round(rank_shift * n_genes)))


def perturb_genes(genes: np.ndarray, targets: np.ndarray, perturb_type: str, *, rank_shift: float = 0.25,
                  max_genes: int | None = None, positions: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Perturb one cell's gene tokens (see the module docstring).

    Parameters
    ----------
    genes : array of int
        The cell's gene tokens in rank order (no special tokens).
    targets : array of int
        Tokens to perturb together (distinct).
    perturb_type : str
        ``delete``, ``overexpress``, ``inhibit`` or ``activate``.
    rank_shift : float
        Fraction of the cell's genes ``inhibit`` / ``activate`` move a gene by.
    max_genes : int, optional
        Gene positions the model has room for (``overexpress`` of an absent gene may need
        to drop the last gene).
    positions : array of int, optional
        Rank of each target in ``genes`` (-1: not expressed), when the caller knows it.

    Returns
    -------
    (new_genes, source)
        The perturbed gene tokens, and for each of them its rank in ``genes`` (-1 for a gene
        inserted by ``overexpress``).
    """
    genes = np.asarray(genes, dtype=np.int64)
    targets = np.asarray(targets, dtype=np.int64)
    n = len(genes)
    if positions is None:
        where = {int(t): i for i, t in enumerate(genes)}
        positions = [where.get(int(t), -1) for t in targets]
    pos = np.asarray(positions, dtype=np.int64)
    present = pos[pos >= 0]
    if perturb_type == "delete":
        keep = np.ones(n, dtype=bool)
        keep[present] = False
        source = np.flatnonzero(keep)
        return genes[source], source
    if perturb_type == "overexpress":
        keep = np.ones(n, dtype=bool)
        keep[present] = False
        source = np.concatenate([pos, np.flatnonzero(keep)])
        new = np.concatenate([targets, genes[keep]])
        if max_genes is not None and len(new) > max_genes:
            source, new = source[:max_genes], new[:max_genes]
        return new, source
    if perturb_type in ("inhibit", "activate"):
        steps = rank_steps(n, rank_shift)
        keys = np.arange(n, dtype=np.float64)
        if perturb_type == "inhibit":
            keys[present] = np.minimum(present + steps, n - 1) + 0.5
        else:
            keys[present] = np.maximum(present - steps, 0) - 0.5
        source = np.argsort(keys, kind="stable")
        return genes[source], source
    raise ValueError(f"perturb_type {perturb_type!r}; expected one of {PERTURB_TYPES}")


def perturbed_length(n_genes: int, n_present: int, n_targets: int, perturb_type: str, max_genes: int) -> int:
    """Gene tokens of a cell after :func:`perturb_genes` (``n_present`` of ``n_targets`` expressed)."""
    if perturb_type == "delete":
        return n_genes - n_present
    if perturb_type == "overexpress":
        return min(n_genes + n_targets - n_present, max_genes)
    return n_genes


# ----------------------------------------------------------------------------- settings
@dataclass(frozen=True)
class CellStates:
    """``--cell_states_to_model``: which cells to perturb and which states to move toward."""

    state_key: str
    start_state: str
    goal_state: str
    alt_states: tuple[str, ...] = ()

    @property
    def targets(self) -> tuple[str, ...]:
        """States whose shift is measured: the goal first, then the alternatives."""
        return (self.goal_state, *self.alt_states)


def parse_cell_states(value: str | Mapping[str, Any] | None) -> CellStates | None:
    """A :class:`CellStates` from a JSON string, a JSON file path or a mapping.

    Raises
    ------
    DataError
        For malformed JSON or missing / extra keys.
    """
    if value is None:
        return None
    if isinstance(value, Mapping):
        raw = dict(value)
        source = "--cell_states_to_model"
    else:
        text = str(value)
        path = Path(text)
        source = f"--cell_states_to_model {text}"
        if not text.lstrip().startswith("{") and path.is_file():
            text = path.read_text(encoding="utf-8")
            source = f"--cell_states_to_model file {path}"
        try:
            raw = json.loads(text)
        except json.JSONDecodeError as err:
            raise DataError(f"{source}: not valid JSON ({err}); expected e.g. "
                            '{"state_key": "cell_type", "start_state": "A", "goal_state": "B", "alt_states": ["C"]}'
                            ) from err
    if not isinstance(raw, dict):
        raise DataError(f"{source}: a {type(raw).__name__}; expected a JSON object")
    known = {"state_key", "start_state", "goal_state", "alt_states"}
    missing = sorted({"state_key", "start_state", "goal_state"} - set(raw))
    extra = sorted(set(raw) - known)
    if missing or extra:
        raise DataError(f"{source}: missing keys {missing}, unknown keys {extra}; expected state_key, start_state, "
                        "goal_state and optionally alt_states (a list)")
    alts = raw.get("alt_states") or []
    if isinstance(alts, str) or not isinstance(alts, Sequence):
        raise DataError(f"{source}: alt_states {alts!r}; expected a list of states")
    states = CellStates(str(raw["state_key"]), str(raw["start_state"]), str(raw["goal_state"]),
                        tuple(str(a) for a in alts))
    if states.start_state == states.goal_state or len(set(states.targets)) != len(states.targets):
        raise DataError(f"{source}: start, goal and alternative states must all differ; got {raw}")
    return states


@dataclass
class PerturbationSettings:
    """What a scan computes (see the module docstring).

    ``genes`` holds token ids, or ``None`` for every gene each cell expresses.
    """

    perturb_type: str = "delete"
    genes: tuple[int, ...] | None = None
    combination: bool = False
    emb_mode: str = "cell"
    emb_layer: int = -1
    rank_shift: float = 0.25
    n_null: int = 20
    seed: int = 0
    chunk_cells: int = 50
    batch_size: int = 64
    cell_states: CellStates | None = None
    max_state_cells: int = 1000
    class_probabilities: bool = True

    def __post_init__(self) -> None:
        if self.perturb_type not in PERTURB_TYPES:
            raise DataError(f"--perturb_type {self.perturb_type!r}; expected one of {list(PERTURB_TYPES)}")
        if self.emb_mode not in PERTURB_EMB_MODES:
            raise DataError(f"--emb_mode {self.emb_mode!r} for perturbation; expected one of {list(PERTURB_EMB_MODES)}")
        if self.genes is None and self.combination:
            raise DataError("--combination perturbs a list of genes together; it cannot be used with --genes all")
        if self.genes is not None and not self.genes:
            raise DataError("--genes is empty; expected gene ids or 'all'")
        if not 0.0 < self.rank_shift <= 1.0:
            raise DataError(f"--rank_shift {self.rank_shift}; expected a fraction of the cell's length in (0, 1]")
        if self.n_null < 0 or self.chunk_cells < 1 or self.batch_size < 1:
            raise DataError(f"--n_null {self.n_null}, --chunk_cells {self.chunk_cells}, --batch_size "
                            f"{self.batch_size}; expected n_null >= 0 and the others >= 1")

    def fingerprint(self) -> dict[str, Any]:
        out = asdict(self)
        out.pop("batch_size")  # does not change results
        out["genes"] = None if self.genes is None else list(self.genes)
        return out


# ----------------------------------------------------------------------------- jobs
@dataclass
class _Job:
    cell: int  # position within the chunk
    targets: np.ndarray
    key: str  # perturbed gene(s), as written
    n_present: int
    positions: np.ndarray  # rank of each target in the cell (-1: not expressed)
    is_null: bool = False
    null_sample: bool = False
    length: int = 0


@dataclass
class _Cell:
    row: int
    prefix: np.ndarray
    genes: np.ndarray
    suffix: np.ndarray
    where: dict[int, int]  # gene token -> rank


@dataclass
class ScanSummary:
    """Counts of a finished scan (``summary.json``)."""

    n_cells: int = 0
    n_perturbations: int = 0
    n_null_perturbations: int = 0
    #: listed gene -> cells not expressing it: skipped there (delete / inhibit / activate) or
    #: inserted at rank 0 (overexpress)
    n_cells_absent: dict[str, int] = field(default_factory=dict)
    absent_action: str = "skipped"
    absent_everywhere: list[str] = field(default_factory=list)
    #: listed gene -> cells expressing it only beyond the model's input size (counted in n_cells_absent)
    n_cells_beyond_input: dict[str, int] = field(default_factory=dict)


class PerturbationScan:
    """A perturbation scan over ``cells``, written under ``output_dir`` (see the module docstring).

    Parameters
    ----------
    analysis_model : AnalysisModel
        The loaded model (a classifier also gives class-probability changes).
    cells : TokenizedCells
        The cells to perturb (already filtered; the start state is selected here).
    specials : SpecialTokens
        Padding / ``<cls>`` / ``<eos>`` ids.
    settings : PerturbationSettings
    output_dir : path
        Where ``scan.json`` and ``chunks/`` go.
    token_to_gene : dict, optional
        Token id -> gene id for the outputs (default ``token_<id>``).
    state_cells : TokenizedCells, optional
        Cells whose state means the shifts are measured against (default ``cells``);
        the states are read from ``settings.cell_states.state_key``.
    provenance : dict, optional
        Input path, model path ... recorded in ``scan.json`` (a resume must match them).
    """

    def __init__(self, analysis_model: AnalysisModel, cells: TokenizedCells, *, specials: SpecialTokens,
                 settings: PerturbationSettings, output_dir: str | Path, device: str | torch.device = "cpu",
                 precision: str = "auto", token_to_gene: Mapping[int, str] | None = None,
                 state_cells: TokenizedCells | None = None, provenance: Mapping[str, Any] | None = None,
                 progress: bool = False) -> None:
        self.am = analysis_model
        self.settings = settings
        self.specials = specials
        self.device = torch.device(device) if not isinstance(device, torch.device) else device
        self.precision = resolve_precision(precision, self.device)
        self.output_dir = Path(output_dir)
        self.token_to_gene = dict(token_to_gene or {})
        self.progress = progress
        self.provenance = dict(provenance or {})
        self.with_probs = analysis_model.is_classifier and settings.class_probabilities
        self.class_names = analysis_model.class_names if self.with_probs else []
        self.pool_mode = "cls" if settings.emb_mode == "cls" else "cell"
        model = analysis_model.model.to(self.device).eval()
        self.values_column = values_column_of(model)  # CellFM: ids and values, its own cls in front
        if self.values_column is not None:
            if settings.perturb_type != "delete" or settings.emb_mode not in ("cell", "cls"):
                raise DataError(f"a {analysis_model.config.model_type} model is perturbed with --perturb_type delete "
                                f"and --emb_mode cell or cls (got {settings.perturb_type!r}, {settings.emb_mode!r}): "
                                "what value an added or moved gene would take is not defined")
            self.reader = None
            self.layer_index = resolve_emb_layer(settings.emb_layer, self.am.num_layers)
        else:
            self.reader = LayerReader(model, settings.emb_layer, logits=self.with_probs)
        states = settings.cell_states
        self.state_cells = state_cells if state_cells is not None else cells
        if states is not None:
            values = cells.column(states.state_key).astype(str)
            start = np.flatnonzero(values == states.start_state)
            if start.size == 0:
                raise DataError(f"--cell_states_to_model: no cell has {states.state_key}={states.start_state!r} "
                                f"(values: {sorted(set(values))[:20]})")
            cells = cells.subset(start)
        if settings.emb_mode == "cls" and self.values_column is None:
            check_cls_inputs(cells, specials)
        self.cells = cells
        self.state_means: dict[str, torch.Tensor] = {}

    # ------------------------------------------------------------------ helpers
    @property
    def layers_run(self) -> int:
        """Encoder layers each forward runs (a model reading values runs all of them)."""
        return self.reader.layers_run if self.reader is not None else self.am.num_layers

    def gene_name(self, token: int) -> str:
        if int(token) == COMBINATION and self.settings.genes is not None:
            return self._key(np.asarray(self.settings.genes))
        return self.token_to_gene.get(int(token), f"token_{int(token)}")

    def _key(self, targets: np.ndarray) -> str:
        return "+".join(self.gene_name(t) for t in targets)

    @property
    def chunk_dir(self) -> Path:
        return self.output_dir / CHUNK_DIR

    def _chunks(self) -> list[np.ndarray]:
        n, size = len(self.cells), self.settings.chunk_cells
        return [np.arange(s, min(s + size, n)) for s in range(0, n, size)]

    def _fingerprint(self) -> dict[str, Any]:
        rows = np.ascontiguousarray(self.cells.rows)
        return {"settings": self.settings.fingerprint(), "provenance": self.provenance,
                "n_cells": int(len(self.cells)), "rows_sha1": hashlib.sha1(rows.tobytes()).hexdigest(),
                "class_names": self.class_names}

    def _check_resume(self, overwrite: bool) -> None:
        scan_file = self.output_dir / SCAN_FILE
        fingerprint = self._fingerprint()
        if scan_file.is_file():
            previous = json.loads(scan_file.read_text(encoding="utf-8"))
            if previous != json.loads(json.dumps(fingerprint)):
                if not overwrite:
                    from geneformer_peft.training.provenance import compare_settings, differing_keys_message

                    diffs = differing_keys_message(compare_settings(previous, fingerprint))
                    raise SettingsChanged(f"{self.output_dir} holds a scan with other settings ({scan_file}); use a "
                                          "new --output_dir, the same settings to resume it, or --overwrite to "
                                          f"start over. Differing settings:\n{diffs}")
                logger.info("%s: other settings; --overwrite: starting over", self.output_dir)
                self._clear_chunks()
            elif overwrite:
                self._clear_chunks()
        self.chunk_dir.mkdir(parents=True, exist_ok=True)
        write_json(scan_file, fingerprint)

    def _clear_chunks(self) -> None:
        for old in self.chunk_dir.glob("*"):
            if old.is_file() and old.name.startswith(("results_", "absent_", "gene_shifts_")):
                old.unlink()

    def _forward(self, token_lists: list[np.ndarray], value_lists: list[np.ndarray] | None = None):
        if self.values_column is not None:
            hidden, emb, logits = forward_with_values(self.am.model, token_lists, value_lists,
                                                      layer_index=self.layer_index, mode=self.pool_mode,
                                                      device=self.device, precision=self.precision)
            probs = class_probabilities(logits, self.am.config) if logits is not None and self.with_probs else None
            return hidden, emb, probs
        input_ids, attention_mask, genes = make_batch(token_lists, self.specials, self.device)
        with autocast(self.device, self.precision):
            hidden, logits = self.reader(input_ids, attention_mask)
        emb = pool_cells(hidden, genes, self.pool_mode)
        probs = class_probabilities(logits, self.am.config) if logits is not None else None  # per task when multi-task
        return hidden, emb, probs

    def _compute_state_means(self) -> None:
        states = self.settings.cell_states
        if states is None:
            return
        values = self.state_cells.column(states.state_key).astype(str)
        for state in states.targets:
            picked = np.flatnonzero(values == state)[:self.settings.max_state_cells]
            if picked.size == 0:
                raise DataError(f"--cell_states_to_model: no cell has {states.state_key}={state!r}; states present: "
                                f"{sorted(set(values))[:20]}")
            emb = embed_cells(self.am.model, self.state_cells.subset(picked), specials=self.specials,
                              mode=self.pool_mode, emb_layer=self.settings.emb_layer,
                              batch_size=self.settings.batch_size, device=self.device, precision=self.precision)
            self.state_means[state] = torch.as_tensor(emb.mean(axis=0), device=self.device)
            logger.info("state %s=%s: mean embedding of %d cells", states.state_key, state, picked.size)

    # ------------------------------------------------------------------ jobs
    def _cell(self, position: int, tokens: np.ndarray) -> _Cell:
        start, stop = self.specials.gene_span(tokens)
        genes = tokens[start:stop]
        return _Cell(int(self.cells.rows[position]), tokens[:start], genes, tokens[stop:],
                     {int(t): r for r, t in enumerate(genes.tolist())})

    def _jobs(self, cells: list[_Cell], absent: dict[int, int]) -> list[_Job]:
        s = self.settings
        jobs: list[_Job] = []
        listed = None if s.genes is None else np.asarray(s.genes, dtype=np.int64)
        for i, cell in enumerate(cells):
            rng = np.random.default_rng([s.seed, cell.row])
            n_specials = len(cell.prefix) + len(cell.suffix)
            max_genes = self.am.max_input_size - n_specials
            where = cell.where
            own: list[_Job] = []
            if listed is None:
                for r, t in enumerate(cell.genes.tolist()):
                    own.append(_Job(i, np.array([t]), self.gene_name(t), 1, np.array([r])))
                if own and s.n_null:
                    for j in rng.choice(len(own), size=min(s.n_null, len(own)), replace=False):
                        own[j].null_sample = True
            else:
                for t in listed.tolist():
                    if t not in where:
                        absent[t] = absent.get(t, 0) + 1
                groups = [listed] if s.combination else [listed[k:k + 1] for k in range(len(listed))]
                for group in groups:
                    ranks = np.array([where.get(t, -1) for t in group.tolist()], dtype=np.int64)
                    keep = np.ones(len(group), bool) if s.perturb_type == "overexpress" else ranks >= 0
                    if keep.any():
                        own.append(_Job(i, group[keep], self._key(group), int((ranks >= 0).sum()), ranks[keep]))
                    elif s.combination:
                        absent[COMBINATION] = absent.get(COMBINATION, 0) + 1  # none of the listed genes here
                if own and s.n_null:
                    size = len(own[0].targets) if s.combination else 1
                    banned = set(listed.tolist())
                    pool = np.array([r for r, t in enumerate(cell.genes.tolist()) if t not in banned], dtype=np.int64)
                    draws = min(s.n_null, len(pool) // max(size, 1))
                    picks = rng.choice(pool, size=draws * size, replace=False) if draws else pool[:0]
                    for d in range(draws):
                        ranks = picks[d * size:(d + 1) * size]
                        targets = cell.genes[ranks]
                        own.append(_Job(i, targets, self._key(targets), size, ranks, is_null=True, null_sample=True))
            for job in own:
                job.length = n_specials + perturbed_length(len(cell.genes), job.n_present, len(job.targets),
                                                           s.perturb_type, max_genes)
            jobs.extend(own)
        return jobs

    # ------------------------------------------------------------------ one chunk
    @torch.no_grad()
    def _run_chunk(self, positions: np.ndarray, absent: dict[int, int]) -> tuple[pd.DataFrame, pd.DataFrame | None]:
        s = self.settings
        token_lists = self.cells.tokens(positions)
        value_lists = None if self.values_column is None else self.cells.token_values(positions, self.values_column)
        cells = [self._cell(int(p), t) for p, t in zip(positions, token_lists)]
        with_genes = s.emb_mode == "cell_and_gene"
        d = self.am.config.hidden_size
        orig_emb = torch.zeros(len(cells), d, device=self.device)
        orig_probs = torch.zeros(len(cells), len(self.class_names), device=self.device)
        orig_genes: list[torch.Tensor | None] = [None] * len(cells)
        lengths = np.array([len(t) for t in token_lists])
        for idx in length_grouped_batches(lengths, s.batch_size):
            hidden, emb, probs = self._forward([token_lists[i] for i in idx],
                                               None if value_lists is None else [value_lists[i] for i in idx])
            orig_emb[idx] = emb
            if probs is not None:
                orig_probs[idx] = probs
            if with_genes:
                for b, i in enumerate(idx):
                    start = len(cells[i].prefix)
                    orig_genes[i] = hidden[b, start:start + len(cells[i].genes)].float()
        orig_state = {k: F.cosine_similarity(orig_emb, m[None], dim=-1) for k, m in self.state_means.items()}

        jobs = self._jobs(cells, absent)
        n = len(jobs)
        cos = np.zeros(n, dtype=np.float32)
        shifts = {k: np.zeros(n, dtype=np.float32) for k in self.state_means}
        deltas = np.zeros((n, len(self.class_names)), dtype=np.float32)
        pair_keys, pair_tokens, pair_cos = [], [], []
        order = np.argsort(-np.array([j.length for j in jobs], dtype=np.int64), kind="stable")
        max_genes_of = {i: self.am.max_input_size - len(c.prefix) - len(c.suffix) for i, c in enumerate(cells)}
        for b0 in range(0, n, s.batch_size):
            batch = order[b0:b0 + s.batch_size]
            seqs, sources, seq_values = [], [], []
            for j in batch:
                job = jobs[j]
                cell = cells[job.cell]
                new, source = perturb_genes(cell.genes, job.targets, s.perturb_type, rank_shift=s.rank_shift,
                                            max_genes=max_genes_of[job.cell], positions=job.positions)
                seqs.append(np.concatenate([cell.prefix, new, cell.suffix]))
                sources.append((new, source))
                if value_lists is not None:  # delete only: every kept gene keeps its own value
                    seq_values.append(value_lists[job.cell][source])
            hidden, emb, probs = self._forward(seqs, seq_values if value_lists is not None else None)
            owners = torch.as_tensor([jobs[j].cell for j in batch], device=self.device)
            cos[batch] = F.cosine_similarity(emb, orig_emb[owners], dim=-1).cpu().numpy()
            for k, mean in self.state_means.items():
                after = F.cosine_similarity(emb, mean[None], dim=-1)
                shifts[k][batch] = (after - orig_state[k][owners]).cpu().numpy()
            if probs is not None:
                deltas[batch] = (probs - orig_probs[owners]).cpu().numpy()
            if with_genes:
                for b, j in enumerate(batch):
                    job = jobs[j]
                    if job.is_null:
                        continue
                    new, source = sources[b]
                    keep = (source >= 0) & ~np.isin(new, job.targets)
                    start = len(cells[job.cell].prefix)
                    after = hidden[b, start + np.flatnonzero(keep)].float()
                    before = orig_genes[job.cell][torch.as_tensor(source[keep], device=self.device)]
                    pair_cos.append(F.cosine_similarity(after, before, dim=-1).cpu().numpy())
                    pair_tokens.append(new[keep])
                    pair_keys.append(np.full(int(keep.sum()), job.key, dtype=object))
        frame = pd.DataFrame({
            "cell": np.array([cells[j.cell].row for j in jobs], dtype=np.int64),
            "perturbed": [j.key for j in jobs],
            "n_perturbed": np.array([j.n_present for j in jobs], dtype=np.int64),
            "is_null": np.array([j.is_null for j in jobs], dtype=bool),
            "null_sample": np.array([j.null_sample for j in jobs], dtype=bool),
            "cosine_sim": cos,
        })
        for k in self.state_means:
            frame[f"shift_to_{k}"] = shifts[k]
        for c, name in enumerate(self.class_names):
            frame[f"prob_delta_{name}"] = deltas[:, c]
        pairs = None
        if with_genes:
            pairs = pd.DataFrame({
                "perturbed": np.concatenate(pair_keys) if pair_keys else np.array([], dtype=object),
                "affected_token": np.concatenate(pair_tokens) if pair_tokens else np.array([], dtype=np.int64),
                "cosine_sim": np.concatenate(pair_cos) if pair_cos else np.array([], dtype=np.float32),
            }).groupby(["perturbed", "affected_token"], sort=False)["cosine_sim"].agg(["sum", "count"]).reset_index()
        return frame, pairs

    # ------------------------------------------------------------------ the scan
    def run(self, *, overwrite: bool = False) -> ScanSummary:
        """Run (or resume) the scan; returns its counts. Results: :meth:`results`, :meth:`gene_shifts`.

        Under ``torchrun`` each rank computes every ``world_size``-th chunk (chunks are
        independent: a cell's null draws are seeded by its row), then all wait for all."""
        from geneformer_peft.training import distributed

        if distributed.is_main_process():  # one process checks, records or clears the scan
            self._check_resume(overwrite)
        distributed.barrier()
        self._compute_state_means()
        chunks = self._chunks()
        done = 0
        for c in tqdm(distributed.shard_of(len(chunks)), desc=f"perturb ({self.settings.perturb_type})",
                      disable=None if self.progress else True):
            positions = chunks[c]
            result_file = self.chunk_dir / f"results_{c:05d}.parquet"
            absent_file = self.chunk_dir / f"absent_{c:05d}.json"
            if result_file.is_file() and absent_file.is_file():
                done += 1
                continue
            absent: dict[int, int] = {}
            frame, pairs = self._run_chunk(positions, absent)
            if pairs is not None:
                with atomic_file(self.chunk_dir / f"gene_shifts_{c:05d}.parquet", suffix=".parquet") as tmp:
                    pairs.to_parquet(tmp, index=False)
            write_json(absent_file, {str(k): v for k, v in absent.items()})
            with atomic_file(result_file, suffix=".parquet") as tmp:  # written last: marks the chunk done
                frame.to_parquet(tmp, index=False)
        if done:
            logger.info("resumed: %d of %d chunks were already computed", done, len(chunks))
        distributed.barrier()  # every rank's chunks are written
        return self.summary()

    def results(self) -> pd.DataFrame:
        """Every perturbation of the scan, one row each (in chunk order)."""
        files = sorted(self.chunk_dir.glob("results_*.parquet"))
        if not files:
            return pd.DataFrame(columns=["cell", "perturbed", "n_perturbed", "is_null", "null_sample", "cosine_sim"])
        return pd.concat([pd.read_parquet(f) for f in files], ignore_index=True)

    def gene_shifts(self) -> pd.DataFrame | None:
        """``cell_and_gene``: mean cosine similarity of each affected gene per perturbed gene."""
        files = sorted(self.chunk_dir.glob("gene_shifts_*.parquet"))
        if self.settings.emb_mode != "cell_and_gene":
            return None
        if not files:
            return pd.DataFrame(columns=["perturbed", "affected_gene", "affected_token", "mean_cosine_sim", "n_cells"])
        pairs = pd.concat([pd.read_parquet(f) for f in files], ignore_index=True)
        pairs = pairs.groupby(["perturbed", "affected_token"], sort=False)[["sum", "count"]].sum().reset_index()
        pairs["mean_cosine_sim"] = pairs["sum"] / pairs["count"]
        pairs["n_cells"] = pairs["count"].astype(np.int64)
        pairs.insert(1, "affected_gene", [self.gene_name(t) for t in pairs["affected_token"]])
        return pairs.drop(columns=["sum", "count"]).sort_values(["perturbed", "mean_cosine_sim"]).reset_index(drop=True)

    def absent_counts(self) -> dict[int, int]:
        """Token -> cells of the scan lacking it (listed genes only)."""
        total: dict[int, int] = {}
        for f in sorted(self.chunk_dir.glob("absent_*.json")):
            for k, v in json.loads(f.read_text(encoding="utf-8")).items():
                total[int(k)] = total.get(int(k), 0) + int(v)
        return total

    def summary(self) -> ScanSummary:
        results = self.results()
        absent = self.absent_counts()
        n = len(self.cells)
        action = "inserted" if self.settings.perturb_type == "overexpress" else "skipped"
        beyond = self.cells.beyond_input([t for t, c in absent.items() if c])
        everywhere = [self.gene_name(t) for t, c in absent.items() if c == n]
        for token, count in absent.items():
            gene, cut = self.gene_name(token), beyond.get(token, 0)
            what = ("inserted at rank 0 in every cell" if action == "inserted"
                    else f"nothing to {self.settings.perturb_type}")
            if count == n and not cut:
                logger.warning("%s is expressed by none of the %d cells: %s", gene, n, what)
            elif cut:
                logger.warning("%s is expressed in %d of %d cells, beyond the first %d genes the model reads in %s: "
                               "%s there", gene, cut + n - count, n, self.cells.max_length,
                               "all of them" if cut == cut + n - count else f"{cut} of them",
                               "inserted at rank 0" if action == "inserted" else "not perturbed")
        return ScanSummary(n_cells=n, n_perturbations=int((~results["is_null"]).sum()) if len(results) else 0,
                           n_null_perturbations=int(results["is_null"].sum()) if len(results) else 0,
                           n_cells_absent={self.gene_name(t): c for t, c in absent.items()}, absent_action=action,
                           absent_everywhere=everywhere,
                           n_cells_beyond_input={self.gene_name(t): c for t, c in beyond.items() if c})
