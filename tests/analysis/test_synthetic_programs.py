"""cell_type_programs: the generator's marker genes, without drawing cells."""
from __future__ import annotations

import pytest

from geneformer_peft.data.synthetic import cell_type_programs, generate_counts


@pytest.mark.parametrize("kwargs", [{}, {"n_genes": 300, "n_cell_types": 3, "n_markers": 10}])
def test_programs_are_the_generators(kwargs):
    adata = generate_counts(n_cells=30, seed=4, cell_seed=1, **kwargs)
    programs = cell_type_programs(seed=4, **kwargs)
    uns = adata.uns["synthetic"]
    assert list(programs) == list(uns["cell_types"])
    for name, p in programs.items():
        assert p["up"] == list(uns["up_genes"][name]) and p["down"] == list(uns["down_genes"][name])
        others = {g for other, q in programs.items() if other != name for g in q["up"]}
        assert p["markers"] and set(p["markers"]) <= set(p["up"]) and not set(p["markers"]) & others


def test_markers_are_expressed_more_by_their_type():
    adata = generate_counts(n_cells=200, n_genes=300, n_cell_types=3, n_markers=10, seed=2)
    programs = cell_type_programs(seed=2, n_genes=300, n_cell_types=3, n_markers=10)
    x = adata.X.toarray() / adata.obs["n_counts"].to_numpy()[:, None]
    for name, p in programs.items():
        cols = adata.var_names.get_indexer(p["markers"])
        own = adata.obs["cell_type"].to_numpy() == name
        assert x[own][:, cols].mean() > 1.5 * x[~own][:, cols].mean()


def test_unknown_parameter_is_an_error():
    with pytest.raises(ValueError, match="n_cells"):
        cell_type_programs(seed=0, n_cells=10)
