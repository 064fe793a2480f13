"""Synthetic single-cell raw counts with cell-type expression programs.

Used for the shipped example and for tests: data shaped like a droplet (10x-style)
experiment, with a learnable but not trivial cell-type signal, generated
deterministically from a seed. Nothing here claims biological truth.

Generative model
----------------
The *world* (genes and programs) is drawn from ``seed`` alone, so labelled cells, and
unlabelled cells for pretraining, share one gene space and one set of programs:

1. **Baseline expression.** Each gene's relative expression ``b_g`` is log-normal
   (``sigma = baseline_sigma``, heavy right tail); about 1% of genes are "housekeeping"
   genes boosted 20-200x, so a few genes take a large share of every library (as
   ribosomal and mitochondrial genes do).
2. **Programs.** Each cell type up-regulates a set of ``n_markers`` marker genes by a
   fold change drawn log-uniformly in [2, 10] and down-regulates ``n_down_markers`` genes
   by 2-5x. Programs overlap: a fraction ``marker_overlap`` of each type's markers is
   borrowed from another type's markers, and the default lung/immune types also share
   lineage modules (for example T and NK cells share a cytotoxic module, all immune cells
   an immune module), so some pairs of types are close. ``program_strength`` multiplies
   every log fold change (1.0 gives the 2-10x range; lower is harder).
3. **Cells.** Cell types are drawn with exact counts from ``class_proportions`` (default:
   decreasing, Zipf-like ``1/k``) and shuffled. Each cell expresses its program with
   its own activity ``a_c`` (gamma, mean 1, coefficient of variation ``activity_cv``), so
   some cells are weak examples of their type. Its library size ``L_c`` is log-normal
   around ``median_library_size`` (``sigma = library_size_sigma``: the 5th-95th
   percentile range spans about 5x by default).
4. **Counts.** The expected count is ``mu_cg = L_c * p_cg`` with
   ``p_cg ∝ b_g * exp(a_c * program_strength * logFC[type_c, g])``, normalised per cell.
   Counts are negative binomial (gamma-Poisson) with a gene-specific dispersion
   ``phi_g`` (log-normal around ``dispersion``, larger for lowly expressed genes).
5. **Dropout.** On top of the negative binomial's own zeros, a count is set to zero with
   probability ``dropout_max * sigmoid(-1.5 * (log mu_cg - log dropout_midpoint))``, which
   rises for lowly expressed genes.

With the defaults (2,000 genes, median library 3,000) a cell has several hundred to about
1,500 detected genes, so tokenised lengths vary realistically.

Output: :class:`anndata.AnnData` with raw integer counts in a CSR ``float32`` matrix;
``var_names`` and ``var["ensembl_id"]`` are Ensembl-like ids (``ENSGSYN00000000001``);
``obs["cell_type"]`` (categorical; labelled data only) and ``obs["n_counts"]``;
``uns["synthetic"]`` records the parameters and each type's up/down genes.
"""
from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import pandas as pd
import scipy.sparse as sp

__all__ = [
    "DEFAULT_CELL_TYPES",
    "cell_type_programs",
    "default_class_proportions",
    "generate_counts",
    "generate_unlabelled_counts",
]

logger = logging.getLogger(__name__)

#: Default cell-type names (lung and immune), in order of decreasing default abundance.
DEFAULT_CELL_TYPES = (
    "T cell",
    "Macrophage",
    "B cell",
    "Alveolar type II cell",
    "NK cell",
    "Monocyte",
    "Endothelial cell",
    "Fibroblast",
    "Alveolar type I cell",
    "Ciliated cell",
    "Dendritic cell",
    "Plasma cell",
    "Mast cell",
    "Club cell",
    "Smooth muscle cell",
    "Basal cell",
    "Neutrophil",
    "Pericyte",
    "Goblet cell",
    "Lymphatic endothelial cell",
)

# Shared lineage modules of the default types: module name -> member types.
_LINEAGE_MODULES = {
    "immune": ("T cell", "Macrophage", "B cell", "NK cell", "Monocyte", "Dendritic cell",
               "Plasma cell", "Mast cell", "Neutrophil"),
    "lymphoid": ("T cell", "B cell", "NK cell", "Plasma cell"),
    "cytotoxic": ("T cell", "NK cell"),
    "b_lineage": ("B cell", "Plasma cell"),
    "myeloid": ("Macrophage", "Monocyte", "Dendritic cell", "Neutrophil", "Mast cell"),
    "phagocyte": ("Macrophage", "Monocyte", "Dendritic cell"),
    "epithelial": ("Alveolar type II cell", "Alveolar type I cell", "Ciliated cell",
                   "Club cell", "Basal cell", "Goblet cell"),
    "alveolar": ("Alveolar type II cell", "Alveolar type I cell"),
    "secretory": ("Club cell", "Goblet cell", "Alveolar type II cell"),
    "endothelial": ("Endothelial cell", "Lymphatic endothelial cell"),
    "mesenchymal": ("Fibroblast", "Smooth muscle cell", "Pericyte"),
    "contractile": ("Smooth muscle cell", "Pericyte"),
}
_LINEAGE_MODULE_SIZE = 15

_HOUSEKEEPING_FRACTION = 0.01
_WORLD_STREAM = 0
_LABELLED_STREAM = 1
_UNLABELLED_STREAM = 2


@dataclass(frozen=True)
class _Params:
    n_genes: int
    n_cell_types: int
    gene_id_prefix: str
    program_strength: float
    n_markers: int
    n_down_markers: int
    marker_overlap: float
    baseline_sigma: float
    median_library_size: float
    library_size_sigma: float
    activity_cv: float
    dispersion: float
    dropout_max: float
    dropout_midpoint: float


@dataclass(frozen=True)
class _World:
    gene_ids: list[str]
    cell_types: list[str]
    log_baseline: np.ndarray  # (G,)
    log_fold_change: np.ndarray  # (K, G), before program_strength
    dispersion: np.ndarray  # (G,)
    housekeeping: np.ndarray  # (G,) bool
    up_genes: dict[str, list[str]]
    down_genes: dict[str, list[str]]


def default_class_proportions(n_cell_types: int) -> np.ndarray:
    """Decreasing, Zipf-like proportions ``p_k ∝ 1 / k`` (k = 1, 2, ...).

    Parameters
    ----------
    n_cell_types : int
        Number of types.

    Returns
    -------
    ndarray of float, shape (n_cell_types,)
        Proportions summing to 1 (for 5 types: 0.44, 0.22, 0.15, 0.11, 0.09).
    """
    if int(n_cell_types) < 1:
        raise ValueError(f"n_cell_types must be >= 1, got {n_cell_types}")
    weights = 1.0 / np.arange(1, int(n_cell_types) + 1, dtype=np.float64)
    return weights / weights.sum()


def _exact_counts(n_cells: int, proportions: np.ndarray) -> np.ndarray:
    """Cells per type by largest remainder; every type with p > 0 gets one cell if possible."""
    raw = proportions * n_cells
    counts = np.floor(raw).astype(np.int64)
    order = np.argsort(-(raw - counts), kind="stable")
    counts[order[: n_cells - counts.sum()]] += 1
    # Give empty types with positive proportion a cell, taken from the largest type.
    for k in np.flatnonzero((counts == 0) & (proportions > 0)):
        donor = int(np.argmax(counts))
        if counts[donor] > 1:
            counts[donor] -= 1
            counts[k] += 1
    return counts


def _check_positive(name: str, value: float, *, allow_zero: bool = False) -> None:
    if not np.isfinite(value) or value < 0 or (value == 0 and not allow_zero):
        expected = ">= 0" if allow_zero else "> 0"
        raise ValueError(f"{name} must be a finite number {expected}, got {value!r}")


def _validate(params: _Params, cell_types: list[str]) -> None:
    if params.n_genes < 50:
        raise ValueError(f"n_genes must be >= 50, got {params.n_genes}")
    if params.n_cell_types < 1:
        raise ValueError(f"n_cell_types must be >= 1, got {params.n_cell_types}")
    if len(cell_types) != params.n_cell_types or len(set(cell_types)) != len(cell_types):
        raise ValueError(
            f"cell_type_names must be {params.n_cell_types} unique names, got {cell_types}"
        )
    needed = params.n_cell_types * (params.n_markers + params.n_down_markers)
    if needed > 0.8 * params.n_genes:
        raise ValueError(
            f"{params.n_cell_types} types x {params.n_markers + params.n_down_markers} program "
            f"genes = {needed} exceeds 80% of n_genes={params.n_genes}; expected fewer"
        )
    if params.n_markers < 0 or params.n_down_markers < 0:
        raise ValueError(
            f"n_markers and n_down_markers must be >= 0, got {params.n_markers}, {params.n_down_markers}"
        )
    if not 0.0 <= params.marker_overlap < 1.0:
        raise ValueError(f"marker_overlap must be in [0, 1), got {params.marker_overlap}")
    if not 0.0 <= params.dropout_max < 1.0:
        raise ValueError(f"dropout_max must be in [0, 1), got {params.dropout_max}")
    _check_positive("program_strength", params.program_strength, allow_zero=True)
    _check_positive("baseline_sigma", params.baseline_sigma)
    _check_positive("median_library_size", params.median_library_size)
    _check_positive("library_size_sigma", params.library_size_sigma, allow_zero=True)
    _check_positive("activity_cv", params.activity_cv, allow_zero=True)
    _check_positive("dispersion", params.dispersion)
    _check_positive("dropout_midpoint", params.dropout_midpoint)
    if not params.gene_id_prefix or not params.gene_id_prefix.isalnum():
        raise ValueError(f"gene_id_prefix must be a non-empty alphanumeric string, got {params.gene_id_prefix!r}")


def _build_world(params: _Params, cell_types: list[str], seed: int) -> _World:
    """Genes, baselines, dispersions and programs: a function of ``seed`` and params only."""
    rng = np.random.default_rng(np.random.SeedSequence([seed, _WORLD_STREAM]))
    n_genes, n_types = params.n_genes, params.n_cell_types
    gene_ids = [f"{params.gene_id_prefix}{i + 1:011d}" for i in range(n_genes)]

    log_baseline = rng.normal(0.0, params.baseline_sigma, size=n_genes)
    n_housekeeping = max(1, int(round(_HOUSEKEEPING_FRACTION * n_genes)))
    housekeeping = np.zeros(n_genes, dtype=bool)
    housekeeping[rng.choice(n_genes, size=n_housekeeping, replace=False)] = True
    log_baseline[housekeeping] += rng.uniform(np.log(20.0), np.log(200.0), size=n_housekeeping)

    # Dispersion: log-normal around `dispersion`, larger for lowly expressed genes.
    centred = (log_baseline - log_baseline.mean()) / log_baseline.std()
    dispersion = params.dispersion * np.exp(rng.normal(0.0, 0.3, size=n_genes) - 0.3 * centred)

    # Programs draw genes from the non-housekeeping pool.
    pool = np.flatnonzero(~housekeeping)
    rng.shuffle(pool)
    cursor = 0

    def take(count: int) -> np.ndarray:
        nonlocal cursor
        if cursor + count > pool.size:  # pool exhausted: reuse genes (validated to be rare)
            rng.shuffle(pool)
            cursor = 0
        genes = pool[cursor: cursor + count]
        cursor += count
        return genes

    def up_fold(count: int) -> np.ndarray:
        return rng.uniform(np.log(2.0), np.log(10.0), size=count)

    log_fc = np.zeros((n_types, n_genes))
    n_borrowed = int(round(params.marker_overlap * params.n_markers)) if n_types > 1 else 0
    private = [take(params.n_markers - n_borrowed) for _ in range(n_types)]
    markers: list[np.ndarray] = []
    for k in range(n_types):
        genes = private[k]
        if n_borrowed:
            donor = (k + 1 + int(rng.integers(n_types - 1))) % n_types  # any other type
            borrowed = rng.choice(private[donor], size=min(n_borrowed, private[donor].size), replace=False)
            genes = np.concatenate([genes, borrowed])
        markers.append(genes)
        log_fc[k, genes] += up_fold(genes.size)

    for members in _LINEAGE_MODULES.values():
        present = [cell_types.index(name) for name in members if name in cell_types]
        if len(present) < 2:
            continue
        genes = take(_LINEAGE_MODULE_SIZE)
        shared = up_fold(genes.size)
        for k in present:
            # Members share the module with their own mild variation of each fold change.
            log_fc[k, genes] += shared * rng.uniform(0.8, 1.2, size=genes.size)

    for k in range(n_types):
        genes = take(params.n_down_markers)
        log_fc[k, genes] -= rng.uniform(np.log(2.0), np.log(5.0), size=genes.size)

    up_genes = {name: [gene_ids[g] for g in np.flatnonzero(log_fc[k] > 0)] for k, name in enumerate(cell_types)}
    down_genes = {name: [gene_ids[g] for g in np.flatnonzero(log_fc[k] < 0)] for k, name in enumerate(cell_types)}
    return _World(gene_ids, list(cell_types), log_baseline, log_fc, dispersion, housekeeping,
                  up_genes, down_genes)


def _sample_counts(
    world: _World, params: _Params, type_ids: np.ndarray, rng: np.random.Generator, chunk_size: int
) -> sp.csr_matrix:
    """Draw the count matrix for cells of the given types, in chunks of cells."""
    n_cells = type_ids.size
    library = params.median_library_size * np.exp(rng.normal(0.0, params.library_size_sigma, size=n_cells))
    if params.activity_cv > 0:
        shape = 1.0 / params.activity_cv**2
        activity = rng.gamma(shape, 1.0 / shape, size=n_cells)
    else:
        activity = np.ones(n_cells)
    theta = 1.0 / world.dispersion  # NB shape (inverse dispersion)
    log_fc = params.program_strength * world.log_fold_change
    blocks = []
    for start in range(0, n_cells, chunk_size):
        stop = min(start + chunk_size, n_cells)
        log_rate = world.log_baseline[None, :] + activity[start:stop, None] * log_fc[type_ids[start:stop]]
        log_rate -= log_rate.max(axis=1, keepdims=True)
        proportions = np.exp(log_rate)
        proportions /= proportions.sum(axis=1, keepdims=True)
        mean = library[start:stop, None] * proportions  # (cells, G)
        rate = rng.gamma(theta[None, :], mean / theta[None, :])
        counts = rng.poisson(rate).astype(np.float32)
        if params.dropout_max > 0:
            z = 1.5 * (np.log(np.maximum(mean, 1e-12)) - np.log(params.dropout_midpoint))
            drop_prob = params.dropout_max / (1.0 + np.exp(z))
            counts[rng.random(counts.shape) < drop_prob] = 0.0
        blocks.append(sp.csr_matrix(counts))
    matrix = sp.vstack(blocks, format="csr") if blocks else sp.csr_matrix((0, params.n_genes), dtype=np.float32)
    matrix.sort_indices()
    return matrix.astype(np.float32)


def generate_counts(
    *,
    n_cells: int,
    n_genes: int = 2000,
    n_cell_types: int = 5,
    class_proportions: Sequence[float] | None = None,
    seed: int = 0,
    gene_id_prefix: str = "ENSGSYN",
    cell_type_names: Sequence[str] | None = None,
    program_strength: float = 1.0,
    n_markers: int = 30,
    n_down_markers: int = 8,
    marker_overlap: float = 0.3,
    baseline_sigma: float = 1.6,
    median_library_size: float = 3000.0,
    library_size_sigma: float = 0.5,
    activity_cv: float = 0.45,
    dispersion: float = 0.4,
    dropout_max: float = 0.5,
    dropout_midpoint: float = 0.5,
    labelled: bool = True,
    cell_seed: int | None = None,
    chunk_size: int = 2048,
) -> Any:
    """Generate synthetic raw counts with cell-type programs (see the module docstring).

    Parameters
    ----------
    n_cells : int
        Number of cells (>= 1).
    n_genes : int, default 2000
        Number of genes (>= 50).
    n_cell_types : int, default 5
        Number of cell types.
    class_proportions : sequence of float, optional
        Share of each type (normalised to sum 1; zeros allowed). Default: decreasing,
        see :func:`default_class_proportions`. Cell counts per type are exact
        (largest remainder) and every type with a positive share gets at least one cell
        when ``n_cells`` allows.
    seed : int, default 0
        Seed of the gene model and programs (the "world"), and of the cells unless
        ``cell_seed`` is given.
    gene_id_prefix : str, default "ENSGSYN"
        Prefix of the gene ids, followed by an 11-digit number.
    cell_type_names : sequence of str, optional
        Names of the types; default the first ``n_cell_types`` of
        :data:`DEFAULT_CELL_TYPES` (then ``"cell type <k>"``). The default names share
        lineage modules; custom names share only borrowed markers.
    program_strength : float, default 1.0
        Multiplier of every log fold change: 1.0 gives 2-10x up and 2-5x down; smaller is
        harder to classify, 0 removes the signal.
    n_markers, n_down_markers : int, default 30 and 8
        Up- and down-regulated genes per type (lineage modules come on top).
    marker_overlap : float, default 0.3
        Fraction of each type's markers borrowed from another type's markers.
    baseline_sigma : float, default 1.6
        Standard deviation of the log baseline expression across genes.
    median_library_size : float, default 3000
        Median total counts per cell.
    library_size_sigma : float, default 0.5
        Standard deviation of the log library size.
    activity_cv : float, default 0.45
        Coefficient of variation of the per-cell program activity.
    dispersion : float, default 0.4
        Typical negative-binomial dispersion (variance = mu + phi * mu^2).
    dropout_max, dropout_midpoint : float, default 0.5 and 0.5
        Extra zero-inflation: probability at most ``dropout_max``, half of it at an
        expected count of ``dropout_midpoint``.
    labelled : bool, default True
        Add ``obs["cell_type"]``. Without labels the types are still drawn (from the
        same proportions) but not recorded.
    cell_seed : int, optional
        Seed of the cells; labelled and unlabelled cells use separate streams, so
        the same seeds give different cells in the two modes.
    chunk_size : int, default 2048
        Cells generated at once (bounds memory). The random draws follow the chunks, so
        identical output needs the same ``chunk_size`` as well as the same seeds.

    Returns
    -------
    anndata.AnnData
        Cells x genes, raw integer counts in CSR float32.

    Raises
    ------
    ValueError
        For out-of-range parameters or mismatched ``class_proportions`` /
        ``cell_type_names``.
    """
    import anndata

    n_cells = int(n_cells)
    if n_cells < 1:
        raise ValueError(f"n_cells must be >= 1, got {n_cells}")
    if int(chunk_size) < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    n_cell_types = int(n_cell_types)
    if cell_type_names is None:
        if n_cell_types < 1:
            raise ValueError(f"n_cell_types must be >= 1, got {n_cell_types}")
        names = list(DEFAULT_CELL_TYPES[:n_cell_types])
        names += [f"cell type {k + 1}" for k in range(len(names), n_cell_types)]
    else:
        names = [str(name) for name in cell_type_names]
    params = _Params(
        n_genes=int(n_genes), n_cell_types=n_cell_types, gene_id_prefix=str(gene_id_prefix),
        program_strength=float(program_strength), n_markers=int(n_markers),
        n_down_markers=int(n_down_markers), marker_overlap=float(marker_overlap),
        baseline_sigma=float(baseline_sigma), median_library_size=float(median_library_size),
        library_size_sigma=float(library_size_sigma), activity_cv=float(activity_cv),
        dispersion=float(dispersion), dropout_max=float(dropout_max),
        dropout_midpoint=float(dropout_midpoint),
    )
    _validate(params, names)

    if class_proportions is None:
        proportions = default_class_proportions(n_cell_types)
    else:
        proportions = np.asarray(class_proportions, dtype=np.float64)
        if proportions.shape != (n_cell_types,) or not np.all(np.isfinite(proportions)) \
                or np.any(proportions < 0) or proportions.sum() <= 0:
            raise ValueError(
                f"class_proportions must be {n_cell_types} non-negative numbers with a positive "
                f"sum, got {list(class_proportions)}"
            )
        proportions = proportions / proportions.sum()

    world = _build_world(params, names, int(seed))
    stream = _LABELLED_STREAM if labelled else _UNLABELLED_STREAM
    entropy = [int(seed), stream] + ([] if cell_seed is None else [int(cell_seed)])
    rng = np.random.default_rng(np.random.SeedSequence(entropy))
    per_type = _exact_counts(n_cells, proportions)
    type_ids = rng.permutation(np.repeat(np.arange(n_cell_types), per_type))
    counts = _sample_counts(world, params, type_ids, rng, int(chunk_size))

    prefix = "cell" if labelled else "unlabelled_cell"
    obs = pd.DataFrame(index=pd.Index([f"{prefix}_{i:06d}" for i in range(n_cells)], name="cell_id"))
    if labelled:
        obs["cell_type"] = pd.Categorical.from_codes(type_ids, categories=names)
    obs["n_counts"] = np.asarray(counts.sum(axis=1)).ravel().astype(np.float64)
    var = pd.DataFrame(
        {"ensembl_id": world.gene_ids, "housekeeping": world.housekeeping},
        index=pd.Index(world.gene_ids, name="gene_id"),
    )
    adata = anndata.AnnData(X=counts, obs=obs, var=var)
    adata.uns["synthetic"] = {
        "seed": int(seed),
        "cell_seed": -1 if cell_seed is None else int(cell_seed),
        "labelled": bool(labelled),
        "params": {**asdict(params)},
        "cell_types": names,
        "class_proportions": proportions.tolist(),
        "up_genes": world.up_genes,
        "down_genes": world.down_genes,
    }
    detected = np.diff(counts.indptr)
    logger.info(
        "generated %d synthetic cells x %d genes (%s); detected genes per cell: median %d, range %d-%d",
        n_cells, params.n_genes, "labelled" if labelled else "unlabelled",
        int(np.median(detected)), int(detected.min()), int(detected.max()),
    )
    return adata


def generate_unlabelled_counts(*, n_cells: int, seed: int = 0, cell_seed: int | None = None,
                               **kwargs: Any) -> Any:
    """Unlabelled cells for pretraining: same genes and programs as :func:`generate_counts`.

    Equivalent to ``generate_counts(n_cells=n_cells, seed=seed, cell_seed=cell_seed,
    labelled=False, **kwargs)``: with the same ``seed`` and world parameters the gene
    space and programs are identical, while the cells come from a separate random stream.

    Parameters
    ----------
    n_cells : int
        Number of cells.
    seed : int, default 0
        Seed of the world (use the labelled data's seed to share its programs).
    cell_seed : int, optional
        Seed of the cells.
    **kwargs
        Any other keyword of :func:`generate_counts` except ``labelled``.

    Returns
    -------
    anndata.AnnData
        Cells x genes without ``obs["cell_type"]``.
    """
    if "labelled" in kwargs:
        raise ValueError(f"generate_unlabelled_counts takes no 'labelled' argument, got {kwargs['labelled']!r}")
    return generate_counts(n_cells=n_cells, seed=seed, cell_seed=cell_seed, labelled=False, **kwargs)


def cell_type_programs(*, seed: int = 0, **world: Any) -> dict[str, dict[str, list[str]]]:
    """Which genes mark which cell type in the world of ``generate_counts(seed=seed, **world)``.

    The world (genes and programs) depends on ``seed`` and the gene and program parameters
    only, so this draws no cells and works for data generated earlier with the same
    settings (the shipped example: ``seed=0`` and the defaults).

    Parameters
    ----------
    seed : int, default 0
        The world seed given to :func:`generate_counts`.
    **world
        Any of ``n_genes``, ``n_cell_types``, ``cell_type_names``, ``gene_id_prefix``,
        ``n_markers``, ``n_down_markers``, ``marker_overlap``, ``baseline_sigma``,
        ``dispersion`` with the values given to :func:`generate_counts` (defaults as there).

    Returns
    -------
    dict
        Type name -> ``{"up": [...], "down": [...], "markers": [...]}``: the up- and
        down-regulated genes (as in ``uns["synthetic"]``, lineage modules and borrowed
        markers included), and ``markers``, the up genes of that type only (up in no other
        type), strongest fold change first.
    """
    import inspect

    allowed = {"n_genes", "n_cell_types", "cell_type_names", "gene_id_prefix", "n_markers", "n_down_markers",
               "marker_overlap", "baseline_sigma", "dispersion"}
    unknown = sorted(set(world) - allowed)
    if unknown:
        raise ValueError(f"cell_type_programs takes no {unknown}; expected world parameters among {sorted(allowed)}")
    defaults = {name: p.default for name, p in inspect.signature(generate_counts).parameters.items()
                if p.default is not inspect.Parameter.empty}
    values = {**defaults, **world}
    n_cell_types = int(values["n_cell_types"])
    if values["cell_type_names"] is None:
        names = list(DEFAULT_CELL_TYPES[:n_cell_types])
        names += [f"cell type {k + 1}" for k in range(len(names), n_cell_types)]
    else:
        names = [str(name) for name in values["cell_type_names"]]
    params = _Params(**{f: (values[f] if f != "n_cell_types" else n_cell_types) for f in _Params.__dataclass_fields__})
    _validate(params, names)
    world_ = _build_world(params, names, int(seed))
    up_any = (world_.log_fold_change > 0).sum(axis=0)
    programs = {}
    for k, name in enumerate(names):
        fold = world_.log_fold_change[k]
        own = np.flatnonzero((fold > 0) & (up_any == 1))
        own = own[np.argsort(-fold[own], kind="stable")]
        programs[name] = {"up": list(world_.up_genes[name]), "down": list(world_.down_genes[name]),
                          "markers": [world_.gene_ids[g] for g in own]}
    return programs
