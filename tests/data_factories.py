"""Synthetic raw-count AnnData and vocabularies for the data tests."""

from __future__ import annotations

from pathlib import Path
from typing import Dict, Optional, Sequence, Tuple

import numpy as np
import pandas as pd
import scipy.sparse as sp

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def gene_ids(n: int, offset: int = 0) -> list:
    """Ensembl-like gene ids ``ENSG00000000001``..."""
    return [f"ENSG{offset + i + 1:011d}" for i in range(n)]


def make_adata(
    n_cells: int = 60,
    n_genes: int = 40,
    *,
    seed: int = 0,
    density: float = 0.3,
    classes: Sequence[str] = ("A", "B", "C"),
    class_sizes: Optional[Sequence[int]] = None,
    dense: bool = False,
    max_count: int = 20,
):
    """AnnData of integer counts (float32), var_names Ensembl-like, obs cell_type/batch."""
    import anndata

    rng = np.random.default_rng(seed)
    counts = rng.integers(1, max_count + 1, size=(n_cells, n_genes)).astype(np.float32)
    counts *= rng.random((n_cells, n_genes)) < density
    counts[:, 0] += 1  # every cell has at least one count
    if class_sizes is None:
        labels = [classes[i % len(classes)] for i in range(n_cells)]
    else:
        labels = [c for c, k in zip(classes, class_sizes) for _ in range(k)]
        assert len(labels) == n_cells
    obs = pd.DataFrame(
        {"cell_type": pd.Categorical(labels), "batch": [f"b{i % 2}" for i in range(n_cells)]},
        index=[f"cell{i}" for i in range(n_cells)],
    )
    var = pd.DataFrame(index=gene_ids(n_genes))
    X = counts if dense else sp.csr_matrix(counts)
    return anndata.AnnData(X=X, obs=obs, var=var)


def make_vocab(
    genes: Sequence[str], *, seed: int = 0, drop_every: int = 0, extra_specials: Sequence[str] = ()
) -> Tuple[Dict[str, int], Dict[str, float]]:
    """Token and median dictionaries over ``genes`` (ids shuffled so they differ from column order).

    ``drop_every=k`` leaves every k-th gene out of the vocabulary.
    """
    rng = np.random.default_rng(seed)
    kept = [g for i, g in enumerate(genes) if not (drop_every and i % drop_every == 0)]
    specials = ["<pad>", "<mask>", *extra_specials]
    token_dictionary = {t: i for i, t in enumerate(specials)}
    for g, i in zip(kept, rng.permutation(len(kept))):
        token_dictionary[g] = len(specials) + int(i)
    medians = {g: float(rng.choice([0.5, 1.0, 2.0, 3.7])) for g in kept}
    return token_dictionary, medians


def reference_encode(counts_row, n_counts, genes, token_dictionary, medians, limit):
    """Slow, obvious per-cell rank value encoding (the test oracle)."""
    items = []
    for value, gene in zip(np.asarray(counts_row, dtype=np.float64), genes):
        if gene in token_dictionary and gene in medians and value > 0:
            x = float(value) / float(n_counts) * 10000.0 / medians[gene]
            items.append((-x, int(token_dictionary[gene])))
    items.sort()
    return [token for _, token in items[:limit]]
