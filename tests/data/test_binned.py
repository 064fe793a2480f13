"""scBERT's binned encoding: the vectorised panel alignment, the bins, the file reader and the
``tokenize --encoding binned`` command, checked against direct computations."""
from __future__ import annotations

import json
import logging

import numpy as np
import pytest
import scipy.sparse as sp
from data_factories import SHARED_DATA, make_adata

from geneformer_peft.cli import main
from geneformer_peft.data.binned import (
    align_to_panel,
    binned_encode,
    read_gene2vec,
    read_gene_panel,
    tokenize_binned,
)
from geneformer_peft.data.dataset_io import load_saved_dataset
from geneformer_peft.errors import DataError

CELLBENCH = SHARED_DATA / "cellbench_celseq2_5cl.h5ad"


def direct_binned(dense_counts: np.ndarray, file_genes, panel, *, bin_num=5, min_genes=200, target_sum=1e4):
    """The obvious per-cell computation (the oracle): look each panel gene up in a dict of the
    file's first columns, normalise by the panel total, log2(1 + x), truncate, cap, append 0."""
    first = {}
    for column, gene in enumerate(file_genes):
        first.setdefault(gene, column)
    kept, rows = [], []
    for cell, counts in enumerate(dense_counts):
        aligned = np.array([counts[first[g]] if g in first else 0.0 for g in panel], dtype=np.float64)
        if (aligned > 0).sum() < min_genes:
            continue
        x = aligned * target_sum / aligned.sum()
        tokens = np.minimum(np.log2(1.0 + x).astype(int), bin_num)
        rows.append(np.append(tokens, 0))
        kept.append(cell)
    return np.array(kept), np.array(rows)


# ----------------------------------------------------------------------------- the real cells
@pytest.mark.skipif(not CELLBENCH.is_file(), reason="CellBench CEL-seq2 data absent (../shared/data)")
def test_every_cellbench_cell_equals_the_direct_computation():
    import anndata

    adata = anndata.read_h5ad(CELLBENCH)
    file_genes = list(adata.var_names)
    absent = [f"NOT_IN_FILE_{i}" for i in range(25)]
    panel = file_genes[:1000] + absent[:12] + file_genes[1000:2000] + absent[12:]  # 2,025 genes, 25 absent
    dataset, stats = tokenize_binned(CELLBENCH, gene_panel=panel, label_column="cell_type", keep_columns=["batch"],
                                     chunk_size=128, show_progress=False, return_stats=True)
    dense = adata.X.toarray() if sp.issparse(adata.X) else np.asarray(adata.X)
    kept, expected = direct_binned(dense, file_genes, panel)
    assert stats.n_cells_kept == len(kept) == len(dataset)
    assert stats.n_cells_below_min_genes == adata.n_obs - len(kept) and stats.n_panel_genes_absent == 25
    assert dataset.features["input_ids"].feature.dtype == "uint8"
    got = np.array(dataset["input_ids"])
    assert got.shape == (len(kept), len(panel) + 1)
    np.testing.assert_array_equal(got, expected)  # every cell, every position
    absent_positions = [i for i, g in enumerate(panel) if g in set(absent)]
    assert not got[:, absent_positions].any() and not got[:, -1].any()
    assert set(np.unique(got)) <= set(range(6)) and got.max() == 5
    assert dataset["cell_type"] == list(adata.obs["cell_type"].astype(str).iloc[kept])
    assert dataset["batch"] == list(adata.obs["batch"].astype(str).iloc[kept])
    assert set(dataset["length"]) == {len(panel) + 1}


# ----------------------------------------------------------------------------- alignment
def test_alignment_takes_first_columns_and_marks_absent_genes(caplog):
    with caplog.at_level(logging.WARNING):
        alignment = align_to_panel(["B", "A", "C", "A", "D"], ["A", "X", "C", "D"], source_name="f")
    np.testing.assert_array_equal(alignment.file_columns, [1, -1, 2, 4])
    assert alignment.n_present == 3 and alignment.n_repeated == 1
    assert "1 gene ids repeat" in caplog.text
    block = sp.csr_matrix(np.array([[1.0, 2.0, 3.0, 4.0, 5.0], [0.0, 0.0, 7.0, 9.0, 0.0]]))
    np.testing.assert_array_equal(alignment.project(block).toarray(), [[2, 0, 3, 5], [0, 0, 7, 0]])


def test_no_panel_gene_in_the_file_is_an_error():
    with pytest.raises(DataError, match="none of the 2 panel genes"):
        align_to_panel(["ENSG1", "ENSG2"], ["TP53", "GAPDH"], source_name="f.h5ad")


# ----------------------------------------------------------------------------- bins
def test_bins_at_their_exact_edges():
    # total 10,000: x = count exactly; log2(1 + x) is an integer at x = 1, 3, 7, 31
    counts = np.array([[1, 3, 7, 31, 40, 9918, 0]], dtype=np.float64)
    np.testing.assert_array_equal(binned_encode(counts), [[1, 2, 3, 5, 5, 5, 0, 0]])
    # total 20,000: count 1 -> x = 0.5 -> bin 0 (expressed, but below the first edge); count 2 -> 1
    counts = np.array([[1, 2, 19997]], dtype=np.float64)
    np.testing.assert_array_equal(binned_encode(counts), [[0, 1, 5, 0]])
    np.testing.assert_array_equal(binned_encode(np.zeros((1, 3))), [[0, 0, 0, 0]])
    assert binned_encode(counts, bin_num=20).max() == 13  # floor(log2(1 + 9998.5))
    assert binned_encode(counts).dtype == np.uint8


def test_cells_below_min_genes_are_counted_and_logged(caplog):
    adata = make_adata(n_cells=30, n_genes=50, density=0.5, seed=1)
    counts = adata.X.toarray()
    counts[:5] = 0
    counts[:5, :3] = 2  # 5 cells with 3 expressed genes
    adata.X = sp.csr_matrix(counts)
    panel = list(adata.var_names)
    with caplog.at_level(logging.WARNING):
        dataset, stats = tokenize_binned(adata, gene_panel=panel, min_genes=10, show_progress=False,
                                         return_stats=True, chunk_size=7)
    assert stats.n_cells_below_min_genes == 5 and len(dataset) == 25
    assert "dropped 5 of 30 cells with fewer than 10 expressed panel genes" in caplog.text
    _, expected = direct_binned(adata.X.toarray(), panel, panel, min_genes=10)
    np.testing.assert_array_equal(np.array(dataset["input_ids"]), expected)


def test_normalised_input_is_refused():
    adata = make_adata(n_cells=5, n_genes=20)
    adata.X = adata.X * 0.37
    with pytest.raises(DataError, match="expected raw counts"):
        tokenize_binned(adata, gene_panel=list(adata.var_names), min_genes=0, show_progress=False)


# ----------------------------------------------------------------------------- panel files
def test_panel_files(tmp_path):
    (tmp_path / "p.txt").write_text("TP53\nGAPDH\nACTB\n")
    np.testing.assert_array_equal(read_gene_panel(tmp_path / "p.txt"), ["TP53", "GAPDH", "ACTB"])
    np.save(tmp_path / "p.npy", np.array(["TP53", "GAPDH"]))
    np.testing.assert_array_equal(read_gene_panel(tmp_path / "p.npy"), ["TP53", "GAPDH"])
    (tmp_path / "dup.txt").write_text("TP53\nACTB\nTP53\n")
    with pytest.raises(DataError, match="names repeat .*'TP53'"):
        read_gene_panel(tmp_path / "dup.txt")
    (tmp_path / "gap.txt").write_text("TP53\n\nACTB\n")
    with pytest.raises(DataError, match="line 2 of the gene panel is empty"):
        read_gene_panel(tmp_path / "gap.txt")
    with pytest.raises(DataError, match="extension '.csv' is not supported"):
        (tmp_path / "p.csv").write_text("TP53\n")
        read_gene_panel(tmp_path / "p.csv")
    np.save(tmp_path / "g.npy", np.ones((3, 4)))
    assert read_gene2vec(tmp_path / "g.npy", n_genes=3).dtype == np.float32
    with pytest.raises(DataError, match="has 3 gene vectors; expected 2"):
        read_gene2vec(tmp_path / "g.npy", n_genes=2)


# ----------------------------------------------------------------------------- the command
@pytest.fixture()
def h5ad(tmp_path):
    adata = make_adata(n_cells=40, n_genes=60, density=0.6, seed=2)
    path = tmp_path / "cells.h5ad"
    adata.write_h5ad(path)
    panel = list(adata.var_names[10:50]) + ["ABSENT1", "ABSENT2"]
    (tmp_path / "panel.txt").write_text("\n".join(panel) + "\n")
    np.save(tmp_path / "g2v.npy", np.random.default_rng(0).normal(size=(len(panel), 8)))
    return adata, path, panel


def test_tokenize_binned_command(tmp_path, h5ad, caplog):
    adata, path, panel = h5ad
    out = tmp_path / "binned.dataset"
    argv = ["tokenize", "--input", str(path), "--output", str(out), "--encoding", "binned", "--gene_panel",
            str(tmp_path / "panel.txt"), "--gene2vec", str(tmp_path / "g2v.npy"), "--label_column", "cell_type",
            "--min_genes", "5", "--chunk_size", "16", "--no_progress"]
    assert main(argv) == 0
    dataset = load_saved_dataset(out)
    assert dataset.features["input_ids"].feature.dtype == "uint8"
    _, expected = direct_binned(adata.X.toarray(), list(adata.var_names), panel, min_genes=5)
    np.testing.assert_array_equal(np.array(dataset["input_ids"]), expected)
    assert (out / "gene_panel.txt").read_text().split() == panel
    np.testing.assert_allclose(np.load(out / "gene2vec.npy"), np.load(tmp_path / "g2v.npy"), rtol=1e-6)
    info = json.loads(dataset.info.description)
    assert info["encoding"] == "binned" and info["gene2vec"] == "gene2vec.npy" and info["gene_num"] == len(panel)
    # the rank value options do not mix with the binned encoding, nor the other way round
    assert main(["tokenize", "--input", str(path), "--output", str(tmp_path / "b"), "--encoding", "binned",
                 "--token_dictionary", "x.pkl", "--gene_panel", str(tmp_path / "panel.txt")]) == 2
    assert "--token_dictionary apply to the rank value encoding" in caplog.text
    assert main(["tokenize", "--input", str(path), "--output", str(tmp_path / "r"), "--gene_panel",
                 str(tmp_path / "panel.txt")]) == 2
    assert "apply to --encoding binned" in caplog.text


def test_without_gene2vec_a_warning(tmp_path, h5ad, caplog):
    _, path, _ = h5ad
    out = tmp_path / "b.dataset"
    with caplog.at_level(logging.WARNING):
        assert main(["tokenize", "--input", str(path), "--output", str(out), "--encoding", "binned",
                     "--gene_panel", str(tmp_path / "panel.txt"), "--min_genes", "5", "--no_progress"]) == 0
    assert "fixed random positional embedding" in caplog.text
    assert not (out / "gene2vec.npy").exists()
    assert json.loads(load_saved_dataset(out).info.description)["gene2vec"] is None
