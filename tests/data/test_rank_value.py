"""Rank value encoding: real data parity, properties, chunking, bad input."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import scipy.sparse as sp
from hypothesis import given, settings
from hypothesis import strategies as st

from data_factories import SHARED_DATA, gene_ids, make_adata, make_vocab, reference_encode
from geneformer_peft.errors import DataError
from geneformer_peft.data.rank_value import rank_value_encode, tokenize_anndata

CELLBENCH = SHARED_DATA / "cellbench_celseq2_5cl.h5ad"
V1_TOKENS = SHARED_DATA / "geneformer_v1_token_dictionary.pkl"
V1_MEDIANS = SHARED_DATA / "geneformer_v1_gene_median_dictionary.pkl"


def _tokenize(adata, tokens, medians, **kwargs):
    kwargs.setdefault("show_progress", False)
    return tokenize_anndata(adata, token_dictionary=tokens, gene_median_dictionary=medians, **kwargs)


# -- real data ------------------------------------------------------------------------------
def test_cellbench_matches_direct_computation(caplog):
    if not (CELLBENCH.exists() and V1_TOKENS.exists() and V1_MEDIANS.exists()):
        pytest.skip(f"real data not found under {SHARED_DATA}")
    import anndata

    from geneformer_peft.data.vocab import load_gene_median_dictionary, load_token_dictionary

    caplog.set_level(logging.INFO, logger="geneformer_peft")
    dataset, stats = _tokenize(
        str(CELLBENCH), V1_TOKENS, V1_MEDIANS, label_column="cell_type",
        obs_filter={"demuxlet_cls": "SNG"}, return_stats=True,
    )
    assert dataset.num_rows == stats.n_cells_kept == 571
    print(f"CellBench: matched genes {stats.n_genes_matched}/{stats.n_genes_total}, "
          f"{100 * stats.matched_count_fraction:.1f}% of counts")
    assert any("of counts" in r.getMessage() for r in caplog.records)

    tokens, medians = load_token_dictionary(V1_TOKENS), load_gene_median_dictionary(V1_MEDIANS)
    adata = anndata.read_h5ad(CELLBENCH)
    adata = adata[(adata.obs["demuxlet_cls"] == "SNG").to_numpy()]
    X = adata.X.toarray() if sp.issparse(adata.X) else np.asarray(adata.X)
    genes = list(adata.var_names)
    assert list(adata.var["gene_id"]) == genes
    for row in range(X.shape[0]):
        expected = reference_encode(X[row], X[row].astype(np.float64).sum(), genes, tokens, medians, 2048)
        assert dataset[row]["input_ids"] == expected, f"cell {adata.obs_names[row]}"
    assert dataset["cell_type"] == list(adata.obs["cell_type"].astype(str))
    lengths = np.array(dataset["length"])
    assert (lengths == 2048).mean() > 0.9  # truncation happened for most cells
    assert stats.n_cells_truncated > 0.9 * 571


# -- properties -----------------------------------------------------------------------------
@settings(max_examples=30, deadline=None)
@given(
    n_cells=st.integers(1, 12),
    n_genes=st.integers(1, 30),
    density=st.floats(0.05, 1.0),
    model_input_size=st.integers(3, 40),
    seed=st.integers(0, 10_000),
    version=st.sampled_from(["V1", "V2"]),
)
def test_rank_value_encoding_properties(n_cells, n_genes, density, model_input_size, seed, version):
    adata = make_adata(n_cells, n_genes, seed=seed, density=density, max_count=3)  # small counts: many ties
    tokens, medians = make_vocab(list(adata.var_names), seed=seed, extra_specials=("<cls>", "<eos>"))
    dataset = _tokenize(adata, tokens, medians, model_input_size=model_input_size, model_version=version)
    id_to_gene = {v: k for k, v in tokens.items()}
    X = adata.X.toarray().astype(np.float64)
    framing = 2 if version == "V2" else 0
    for row, ids in enumerate(dataset["input_ids"]):
        assert len(ids) == dataset[row]["length"] <= model_input_size
        if version == "V2":
            assert ids[0] == tokens["<cls>"] and ids[-1] == tokens["<eos>"]
            ids = ids[1:-1]
        assert len(set(ids)) == len(ids)  # no repeated gene
        col = {g: i for i, g in enumerate(adata.var_names)}
        x = [X[row, col[id_to_gene[t]]] / X[row].sum() * 1e4 / medians[id_to_gene[t]] for t in ids]
        assert all(v > 0 for v in x)  # zero genes absent
        assert all(a >= b for a, b in zip(x, x[1:]))  # descending
        n_expressed = int((X[row] > 0).sum())
        assert len(ids) == min(n_expressed, model_input_size - framing)

    # shuffling the gene columns changes nothing
    perm = np.random.default_rng(seed).permutation(n_genes)
    shuffled = _tokenize(adata[:, perm].copy(), tokens, medians, model_input_size=model_input_size, model_version=version)
    assert shuffled["input_ids"] == dataset["input_ids"]


def test_rank_value_encode_ties_by_token_id_dense_and_sparse():
    counts = np.array([[2, 2, 0, 2], [0, 0, 0, 0]], dtype=np.float64)
    kwargs = dict(n_counts=np.array([6.0, 1.0]), gene_token_ids=np.array([9, 4, 5, 7]),
                  gene_medians=np.ones(4), model_input_size=10)
    dense = rank_value_encode(counts, **kwargs)
    sparse = rank_value_encode(sp.csr_matrix(counts), **kwargs)
    assert [d.tolist() for d in dense] == [s.tolist() for s in sparse] == [[4, 7, 9], []]


def test_matches_reference_with_unmatched_genes_and_obs_n_counts():
    adata = make_adata(30, 25, seed=3)
    tokens, medians = make_vocab(list(adata.var_names), seed=3, drop_every=4)
    adata.obs["n_counts"] = np.asarray(adata.X.sum(axis=1)).ravel() * 1.5  # user-provided totals
    dataset, stats = _tokenize(adata, tokens, medians, model_input_size=8, return_stats=True)
    X = adata.X.toarray()
    for row in range(30):
        expected = reference_encode(X[row], adata.obs["n_counts"].iloc[row], list(adata.var_names), tokens, medians, 8)
        assert dataset[row]["input_ids"] == expected
    assert stats.n_genes_matched == len(medians) < stats.n_genes_total
    assert 0 < stats.matched_count_fraction < 1


def test_chunked_equals_whole_and_backed_file(tmp_path):
    adata = make_adata(57, 30, seed=1)
    adata.obs["filter_pass"] = [0 if i % 5 == 0 else 1 for i in range(57)]
    tokens, medians = make_vocab(list(adata.var_names), seed=1)
    path = tmp_path / "cells.h5ad"
    adata.write_h5ad(path)
    common = dict(label_column="cell_type", keep_columns=["batch"], model_input_size=12)
    whole = _tokenize(adata, tokens, medians, chunk_size=1000, **common)
    chunked = _tokenize(str(path), tokens, medians, chunk_size=4, **common)  # backed mode
    assert whole.num_rows == 57 - 12
    assert whole.column_names == ["input_ids", "length", "cell_type", "batch"]
    assert whole.to_dict() == chunked.to_dict()
    dense = make_adata(57, 30, seed=1, dense=True)
    dense.obs["filter_pass"] = adata.obs["filter_pass"]
    assert _tokenize(dense, tokens, medians, chunk_size=7, **common).to_dict() == whole.to_dict()


def test_repeated_gene_ids_are_summed():
    adata = make_adata(10, 6, seed=2, density=1.0)
    adata.var_names = gene_ids(3) + gene_ids(3)  # each gene twice
    tokens, medians = make_vocab(gene_ids(3), seed=2)
    dataset = _tokenize(adata, tokens, medians)
    X = adata.X.toarray()
    summed = X[:, :3] + X[:, 3:]
    for row in range(10):
        assert dataset[row]["input_ids"] == reference_encode(summed[row], X[row].sum(), gene_ids(3), tokens, medians, 2048)


def test_saved_dataset_roundtrip(tmp_path):
    import datasets

    adata = make_adata(20, 10)
    tokens, medians = make_vocab(list(adata.var_names))
    dataset = _tokenize(adata, tokens, medians, label_column="cell_type")
    dataset.save_to_disk(str(tmp_path / "x.dataset"))
    loaded = datasets.load_from_disk(str(tmp_path / "x.dataset"))
    assert loaded.to_dict() == dataset.to_dict()
    assert '"n_cells_kept": 20' in loaded.info.description


# -- bad input ------------------------------------------------------------------------------
def test_missing_label_column(tmp_path):
    adata = make_adata(10, 10)
    path = tmp_path / "cells.h5ad"
    adata.write_h5ad(path)
    tokens, medians = make_vocab(list(adata.var_names))
    with pytest.raises(DataError, match=r"cells\.h5ad: label column obs\['celltype'\] does not exist.*cell_type"):
        _tokenize(str(path), tokens, medians, label_column="celltype")


def test_no_gene_in_vocabulary():
    adata = make_adata(10, 10)
    tokens, medians = make_vocab(gene_ids(10, offset=100))
    with pytest.raises(DataError, match=r"none of the 10 gene ids.*ENSG00000000001"):
        _tokenize(adata, tokens, medians)


def test_gene_id_column_missing():
    adata = make_adata(10, 10)
    tokens, medians = make_vocab(list(adata.var_names))
    with pytest.raises(DataError, match=r"gene id column var\['ensembl'\] does not exist"):
        _tokenize(adata, tokens, medians, gene_id_column="ensembl")


@pytest.mark.parametrize(
    "transform, value",
    [(lambda X: -X, r"-\d+\.0"), (lambda X: X / X.sum(axis=1, keepdims=True) * 100, r"\d+\.\d+")],
    ids=["negative", "normalised"],
)
def test_non_count_matrix(tmp_path, transform, value):
    import anndata

    adata = make_adata(10, 10, dense=True)
    adata.X = transform(np.asarray(adata.X, dtype=np.float64))
    path = tmp_path / "norm.h5ad"
    adata.write_h5ad(path)
    tokens, medians = make_vocab(list(adata.var_names))
    with pytest.raises(DataError, match=rf"norm\.h5ad: field X \(counts\) holds value {value} for cell 'cell0'.*raw counts"):
        _tokenize(str(path), tokens, medians)


def test_empty_file(tmp_path):
    adata = make_adata(10, 10)[:0].copy()
    path = tmp_path / "empty.h5ad"
    adata.write_h5ad(path)
    tokens, medians = make_vocab(gene_ids(10))
    with pytest.raises(DataError, match=r"empty\.h5ad: the file holds 0 cells"):
        _tokenize(str(path), tokens, medians)


def test_missing_file_and_v2_without_specials(tmp_path):
    tokens, medians = make_vocab(gene_ids(10))
    with pytest.raises(DataError, match=r"nope\.h5ad: input file does not exist"):
        _tokenize(str(tmp_path / "nope.h5ad"), tokens, medians)
    with pytest.raises(DataError, match=r"V2 needs special tokens \['<cls>', '<eos>'\]"):
        _tokenize(make_adata(5, 10), tokens, medians, model_version="V2")


def test_obs_filter_missing_column_and_no_cells_left():
    adata = make_adata(10, 10)
    tokens, medians = make_vocab(gene_ids(10))
    with pytest.raises(DataError, match=r"obs filter column obs\['demuxlet_cls'\] does not exist"):
        _tokenize(adata, tokens, medians, obs_filter={"demuxlet_cls": "SNG"})
    with pytest.raises(DataError, match=r"no cell passes the filters"):
        _tokenize(adata, tokens, medians, obs_filter={"cell_type": "Z"})


def test_loom_without_loompy_names_the_extra(tmp_path):
    try:
        import loompy  # noqa: F401
    except ImportError:
        pass
    else:
        pytest.skip("loompy is installed")
    path = tmp_path / "cells.loom"
    path.write_bytes(b"")
    tokens, medians = make_vocab(gene_ids(3))
    with pytest.raises(DataError, match=r"cells\.loom: reading \.loom files needs loompy; install the 'loom' extra"):
        _tokenize(str(path), tokens, medians)
