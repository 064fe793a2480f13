"""The tiny job data's raw counts, for the Python API and compat tests."""
from __future__ import annotations


def make_adata():
    """The tiny job data's raw counts (make_job_data draws them from the same seed)."""
    from geneformer_peft.data.synthetic import generate_counts

    return generate_counts(n_cells=100, n_genes=200, n_cell_types=3, seed=0, class_proportions=[0.4, 0.35, 0.25])
