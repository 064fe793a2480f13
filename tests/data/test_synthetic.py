"""Tests for geneformer_peft.data.synthetic."""
from __future__ import annotations

import re

import numpy as np
import pytest
import scipy.sparse as sp

pytest.importorskip("anndata")

from geneformer_peft.data.synthetic import (  # noqa: E402
    DEFAULT_CELL_TYPES,
    default_class_proportions,
    generate_counts,
    generate_unlabelled_counts,
)

N_CELLS = 1500


@pytest.fixture(scope="module")
def adata():
    return generate_counts(n_cells=N_CELLS, seed=7)


def log_normalised(matrix):
    totals = np.asarray(matrix.sum(axis=1)).ravel()
    normalised = sp.csr_matrix(matrix.multiply(1e4 / totals[:, None]))
    normalised.data = np.log1p(normalised.data)
    return normalised


def test_deterministic_by_seed(adata):
    again = generate_counts(n_cells=N_CELLS, seed=7)
    assert (adata.X != again.X).nnz == 0
    assert adata.obs.equals(again.obs) and adata.var.equals(again.var)
    other = generate_counts(n_cells=N_CELLS, seed=8)
    assert (adata.X != other.X).nnz > 0
    # Another cell seed: same world (programs), different cells.
    resampled = generate_counts(n_cells=N_CELLS, seed=7, cell_seed=1)
    assert resampled.uns["synthetic"]["up_genes"] == adata.uns["synthetic"]["up_genes"]
    assert (adata.X != resampled.X).nnz > 0


def test_format_integer_counts_and_ids(adata):
    X = adata.X
    assert sp.isspmatrix_csr(X) and X.dtype == np.float32
    assert X.shape == (N_CELLS, 2000)
    assert np.all(X.data == np.round(X.data)) and X.data.min() >= 1  # explicit zeros are not stored
    assert re.fullmatch(r"ENSGSYN\d{11}", adata.var_names[0])
    assert adata.var_names[0] == "ENSGSYN00000000001"
    assert adata.var_names.is_unique
    assert list(adata.var["ensembl_id"]) == list(adata.var_names)
    np.testing.assert_allclose(adata.obs["n_counts"], np.asarray(X.sum(axis=1)).ravel())
    assert set(adata.obs["cell_type"].cat.categories) == set(DEFAULT_CELL_TYPES[:5])


def test_default_imbalance_and_requested_proportions(adata):
    counts = adata.obs["cell_type"].value_counts().reindex(list(DEFAULT_CELL_TYPES[:5])).to_numpy()
    assert counts.sum() == N_CELLS
    assert np.all(np.abs(counts - default_class_proportions(5) * N_CELLS) < 1)  # exact up to rounding
    assert np.all(np.diff(counts) < 0) and counts[0] / counts[-1] >= 4
    custom = generate_counts(n_cells=200, n_genes=300, n_cell_types=3, class_proportions=[0.7, 0.2, 0.1],
                             cell_type_names=["type_A", "type_B", "type_C"], n_markers=20, seed=1)
    assert custom.obs["cell_type"].value_counts().to_dict() == {"type_A": 140, "type_B": 40, "type_C": 20}
    # Labels are shuffled, not in blocks.
    codes = custom.obs["cell_type"].cat.codes.to_numpy()
    assert not np.all(np.diff(codes) >= 0)


def test_programs_overlap_and_are_expressed(adata):
    up = {name: set(genes) for name, genes in adata.uns["synthetic"]["up_genes"].items()}
    names = list(up)
    shared = {(a, b): len(up[a] & up[b]) for i, a in enumerate(names) for b in names[i + 1:]}
    assert sum(n > 0 for n in shared.values()) >= 3  # several pairs share genes
    assert shared[("T cell", "NK cell")] > 0  # lineage module
    assert all(len(up[a] - up[b]) > 0 for a in names for b in names if a != b)  # each has own genes
    assert all(len(genes) > 0 for genes in adata.uns["synthetic"]["down_genes"].values())

    # Markers private to a type are higher in that type than in the rest.
    X = log_normalised(adata.X)
    labels = adata.obs["cell_type"].to_numpy()
    position = {gene: i for i, gene in enumerate(adata.var_names)}
    for name in names:
        private = sorted(up[name] - set().union(*(up[o] for o in names if o != name)))
        columns = [position[g] for g in private]
        inside = X[labels == name][:, columns].mean()
        outside = X[labels != name][:, columns].mean()
        assert inside > 1.5 * outside, name


def test_detected_genes_and_library_sizes_vary_realistically(adata):
    detected = np.diff(adata.X.indptr)
    assert 300 <= detected.mean() <= 1500
    assert np.percentile(detected, 95) / np.percentile(detected, 5) > 1.8
    totals = adata.obs["n_counts"].to_numpy()
    assert 3 <= np.percentile(totals, 95) / np.percentile(totals, 5) <= 10
    # Heavy-tailed genes: a few housekeeping genes take a large share, many genes are rare.
    gene_totals = np.sort(np.asarray(adata.X.sum(axis=0)).ravel())[::-1]
    assert gene_totals[:20].sum() / gene_totals.sum() > 0.15
    assert (gene_totals == 0).mean() < 0.2


def balanced_accuracy_of_logistic_regression(data):
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import balanced_accuracy_score

    X = log_normalised(data.X)
    y = data.obs["cell_type"].cat.codes.to_numpy()
    split = int(0.7 * len(y))
    clf = LogisticRegression(max_iter=200, C=0.1).fit(X[:split], y[:split])
    return balanced_accuracy_score(y[split:], clf.predict(X[split:]))


@pytest.mark.filterwarnings("ignore::sklearn.exceptions.ConvergenceWarning")
def test_signal_is_learnable_but_not_trivial(adata):
    pytest.importorskip("sklearn")
    strong = balanced_accuracy_of_logistic_regression(adata)
    assert strong > 0.8  # chance is 0.2
    weak = balanced_accuracy_of_logistic_regression(
        generate_counts(n_cells=N_CELLS, seed=7, program_strength=0.4))
    none = balanced_accuracy_of_logistic_regression(
        generate_counts(n_cells=N_CELLS, seed=7, program_strength=0.0))
    assert none < 0.35  # no program, no signal: the labels are not leaked elsewhere
    assert none < weak < strong


def test_unlabelled_cells_share_the_world(adata):
    unlabelled = generate_unlabelled_counts(n_cells=300, seed=7)
    assert "cell_type" not in unlabelled.obs
    assert list(unlabelled.var_names) == list(adata.var_names)
    assert unlabelled.uns["synthetic"]["up_genes"] == adata.uns["synthetic"]["up_genes"]
    assert (unlabelled.X != adata.X[:300]).nnz > 0
    assert not set(unlabelled.obs_names) & set(adata.obs_names)
    again = generate_unlabelled_counts(n_cells=300, seed=7)
    assert (unlabelled.X != again.X).nnz == 0
    with pytest.raises(ValueError, match="no 'labelled' argument"):
        generate_unlabelled_counts(n_cells=10, labelled=True)


def test_writes_h5ad(tmp_path):
    anndata = pytest.importorskip("anndata")
    small = generate_counts(n_cells=50, n_genes=200, n_markers=10, n_down_markers=2, seed=3)
    small.write_h5ad(tmp_path / "s.h5ad")
    back = anndata.read_h5ad(tmp_path / "s.h5ad")
    assert (back.X != small.X).nnz == 0
    assert list(back.obs["cell_type"]) == list(small.obs["cell_type"])


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(n_cells=0), "n_cells must be >= 1, got 0"),
        (dict(n_cells=10, class_proportions=[0.5, 0.5]), "class_proportions must be 5"),
        (dict(n_cells=10, class_proportions=[1, -1, 1, 1, 1]), "non-negative"),
        (dict(n_cells=10, cell_type_names=["a", "a", "b", "c", "d"]), "unique names"),
        (dict(n_cells=10, n_genes=100), "exceeds 80% of n_genes=100"),
        (dict(n_cells=10, program_strength=-1.0), "program_strength must be a finite number >= 0"),
        (dict(n_cells=10, dropout_max=1.0), r"dropout_max must be in \[0, 1\)"),
        (dict(n_cells=10, gene_id_prefix="EN-SG"), "alphanumeric"),
    ],
)
def test_rejects_bad_parameters(kwargs, match):
    with pytest.raises(ValueError, match=match):
        generate_counts(**kwargs)
