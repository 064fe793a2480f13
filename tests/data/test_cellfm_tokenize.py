"""CellFM's encoding: expressed vocabulary genes with log1p(count * 1e4 / cell total), at most
max_genes (highest values first, ties by the lower id), checked against a per-cell oracle; the
``tokenize --encoding cellfm`` command and the encoding it records."""
from __future__ import annotations

import json

import anndata
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
from data_factories import make_adata, make_vocab

from geneformer_peft.checks.data import data_encoding
from geneformer_peft.cli import main
from geneformer_peft.data.cellfm import cellfm_encode, tokenize_cellfm
from geneformer_peft.data.dataset_io import load_saved_dataset
from geneformer_peft.errors import DataError


def oracle(dense_counts: np.ndarray, file_genes, token_dictionary, max_genes):
    """Per cell, the obvious way: sum repeated ids, normalise by the cell's total over all file
    genes, log1p, keep vocabulary genes with a count, sort by (-value, id), cut."""
    ids_out, values_out = [], []
    for row in dense_counts.astype(np.float64):
        total = row.sum()
        summed: dict[str, float] = {}
        for gene, count in zip(file_genes, row):
            summed[gene] = summed.get(gene, 0.0) + count
        pairs = [(np.log1p(c * 1e4 / total), token_dictionary[g]) for g, c in summed.items()
                 if c > 0 and g in token_dictionary and not g.startswith("<")]
        pairs.sort(key=lambda p: (-p[0], p[1]))
        pairs = pairs[:max_genes]
        ids_out.append([i for _, i in pairs])
        values_out.append([v for v, _ in pairs])
    return ids_out, values_out


@pytest.mark.parametrize("max_genes", [4, 1000])
def test_tokens_and_values_equal_the_oracle(max_genes):
    adata = make_adata(30, 25, seed=3, max_count=4)  # small counts: many ties
    genes = list(adata.var_names)
    genes[7] = genes[3]  # a repeated id: its columns are summed
    adata.var_names = genes
    token_dictionary, _ = make_vocab(list(dict.fromkeys(genes)), drop_every=4)
    dataset, stats = tokenize_cellfm(adata, token_dictionary=token_dictionary, max_genes=max_genes,
                                     label_column="cell_type", chunk_size=7, show_progress=False, return_stats=True)
    ids, values = oracle(adata.X.toarray(), genes, token_dictionary, max_genes)
    assert [list(r) for r in dataset["input_ids"]] == ids
    for got, want in zip(dataset["values"], values):
        np.testing.assert_allclose(got, want, rtol=1e-6)
    assert list(dataset["length"]) == [len(r) for r in ids]
    assert dataset.features["values"].feature.dtype == "float32"
    full = oracle(adata.X.toarray(), genes, token_dictionary, 10**6)[0]
    assert stats.n_cells_truncated == sum(len(r) > max_genes for r in full)
    assert (max_genes == 4) == (stats.n_cells_truncated > 0)
    info = json.loads(dataset.info.description)
    assert info["encoding"] == "cellfm" and info["max_genes"] == max_genes and info["n_file_genes_repeated"] == 1
    assert data_encoding(dataset) == "cellfm"
    assert dataset.column_names == ["input_ids", "values", "length", "cell_type"]


def test_ties_keep_the_lower_id_whatever_the_column_order():
    counts = np.array([[5, 5, 5, 5, 1]], dtype=np.float64)
    ids, values = cellfm_encode(sp.csr_matrix(counts), totals=np.array([21.0]),
                                gene_token_ids=np.array([9, 3, 7, 5, 2]), max_genes=2)
    assert ids[0].tolist() == [3, 5]
    np.testing.assert_allclose(values[0], np.log1p(5 * 1e4 / 21), rtol=1e-6)
    shuffled = cellfm_encode(sp.csr_matrix(counts[:, [4, 2, 0, 3, 1]]), totals=np.array([21.0]),
                             gene_token_ids=np.array([2, 7, 9, 5, 3]), max_genes=2)
    assert shuffled[0][0].tolist() == [3, 5]


def test_special_tokens_are_never_genes_and_no_match_is_refused():
    adata = anndata.AnnData(X=sp.csr_matrix(np.array([[3.0, 2.0, 1.0]])),
                            var=pd.DataFrame(index=["<pad>", "G1", "G2"]))
    dataset = tokenize_cellfm(adata, token_dictionary={"<pad>": 0, "G1": 1, "G2": 2}, show_progress=False)
    assert dataset["input_ids"] == [[1, 2]]
    with pytest.raises(DataError, match="none of the 3 gene ids .* token dictionary; expected ids of its kind"):
        tokenize_cellfm(adata, token_dictionary={"<pad>": 0, "X1": 1}, show_progress=False)
    with pytest.raises(DataError, match="max_genes 0"):
        tokenize_cellfm(adata, token_dictionary={"<pad>": 0, "G1": 1}, max_genes=0, show_progress=False)


def test_tokenize_cellfm_command(tmp_path, caplog):
    adata = make_adata(12, 30, seed=1)
    path = tmp_path / "cells.h5ad"
    adata.write_h5ad(path)
    token_dictionary, _ = make_vocab(list(adata.var_names))
    (tmp_path / "vocab.json").write_text(json.dumps(token_dictionary))
    out = tmp_path / "cellfm.dataset"
    assert main(["tokenize", "--input", str(path), "--output", str(out), "--encoding", "cellfm", "--token_dictionary",
                 str(tmp_path / "vocab.json"), "--max_genes", "6", "--label_column", "cell_type", "--no_progress"]) == 0
    dataset = load_saved_dataset(out)
    ids, _ = oracle(adata.X.toarray(), list(adata.var_names), token_dictionary, 6)
    assert [list(r) for r in dataset["input_ids"]] == ids
    assert json.loads(dataset.info.description)["encoding"] == "cellfm"
    # the build_vocab route: its dictionary's ids, no special token among the genes
    built = tmp_path / "built"
    assert main(["tokenize", "--input", str(path), "--output", str(tmp_path / "b.dataset"), "--encoding", "cellfm",
                 "--build_vocab", str(built), "--no_progress"]) == 0
    vocab = json.loads((built / "token_dictionary.json").read_text())
    assert min(min(r) for r in load_saved_dataset(tmp_path / "b.dataset")["input_ids"]) >= 2 == len(
        [k for k in vocab if k.startswith("<")])
    # the other encodings' options are refused, not ignored
    for extra, said in ((["--gene_median_dictionary", "m.json"], "--gene_median_dictionary apply to the rank value"),
                        (["--model_input_size", "100"], "--model_input_size 100 apply to the rank value"),
                        (["--gene_panel", "p.txt"], "--gene_panel apply to --encoding binned; this run uses "
                                                    "--encoding cellfm")):
        assert main(["tokenize", "--input", str(path), "--output", str(tmp_path / "x"), "--encoding", "cellfm",
                     "--token_dictionary", str(tmp_path / "vocab.json"), *extra]) == 2
        assert said in caplog.text
    assert main(["tokenize", "--input", str(path), "--output", str(tmp_path / "y"), "--max_genes", "5",
                 "--build_vocab", str(tmp_path / "v2")]) == 2
    assert "--max_genes applies to --encoding cellfm" in caplog.text
    assert main(["tokenize", "--input", str(path), "--output", str(tmp_path / "z"), "--encoding", "cellfm"]) == 2
    assert "--encoding cellfm needs --token_dictionary" in caplog.text
    assert not (tmp_path / "x").exists() and not (tmp_path / "z").exists()


def _symbol_vocabulary_case():
    """12 cells of 8 Ensembl-id genes; a vocabulary of symbols (as CellFM's release); a symbol ->
    Ensembl map in which gene 5 has two symbols of the vocabulary (ambiguous), gene 6 two symbols
    of which one is in the vocabulary, and gene 7 none at all."""
    adata = make_adata(12, 8, seed=4, density=0.6)
    ensembl = [f"ENSG{i:011d}" for i in range(8)]
    adata.var_names = [f"{g}.{i % 3 + 1}" for i, g in enumerate(ensembl)]  # versioned ids
    symbols = [f"SYM{i}" for i in range(8)]
    name_map = {symbols[i]: ensembl[i] for i in range(5)}
    name_map.update({"SYM5": ensembl[5], "SYM5B": ensembl[5], "SYM6": ensembl[6], "OLD6": ensembl[6]})
    vocabulary = {"<pad>": 0, **{s: i + 1 for i, s in enumerate(symbols[:7] + ["SYM5B"])}}
    return adata, symbols, name_map, vocabulary


def test_ensembl_ids_against_a_vocabulary_of_symbols_read_the_map_backwards(tmp_path, caplog):
    adata, symbols, name_map, vocabulary = _symbol_vocabulary_case()
    with pytest.raises(DataError, match=r"100\.0% of the 8 gene ids in var_names are Ensembl ids .* holds gene "
                                        r"symbols .*--gene_name_id_dictionary"):
        tokenize_cellfm(adata, token_dictionary=vocabulary, show_progress=False)
    dataset, stats = tokenize_cellfm(adata, token_dictionary=vocabulary, gene_name_id_dictionary=name_map,
                                     max_genes=50, show_progress=False, return_stats=True)
    # what the map gives by hand: genes 0-4 and 6 become their symbols; 5 is ambiguous, 7 unmapped
    renamed = symbols[:5] + [str(adata.var_names[5]), "SYM6", str(adata.var_names[7])]
    ids, values = oracle(adata.X.toarray(), renamed, vocabulary, 50)
    assert [list(r) for r in dataset["input_ids"]] == ids
    for got, want in zip(dataset["values"], values):
        np.testing.assert_allclose(got, want, rtol=1e-6)
    figures = stats.gene_name_mapping
    assert figures["direction"] == "Ensembl id -> symbol"
    assert (figures["n_genes_mapped"], figures["n_genes_symbol"], figures["n_genes_ambiguous"],
            figures["n_genes_unmapped"]) == (6, 0, 1, 1)
    col = adata.X.toarray().sum(axis=0)
    assert figures["mapped_count_fraction"] == pytest.approx(col[[0, 1, 2, 3, 4, 6]].sum() / col.sum())
    assert json.loads(dataset.info.description)["gene_name_mapping"] == figures
    # the command: a CSV map, the figures in the saved dataset
    path = tmp_path / "cells.h5ad"
    adata.write_h5ad(path)
    (tmp_path / "vocab.json").write_text(json.dumps(vocabulary))
    (tmp_path / "map.csv").write_text("symbol,ensembl_id\n" + "".join(f"{s},{e}\n" for s, e in name_map.items()))
    out = tmp_path / "cells.dataset"
    assert main(["tokenize", "--input", str(path), "--output", str(out), "--encoding", "cellfm", "--token_dictionary",
                 str(tmp_path / "vocab.json"), "--gene_name_id_dictionary", str(tmp_path / "map.csv"),
                 "--no_progress"]) == 0
    saved = load_saved_dataset(out)
    assert [list(r) for r in saved["input_ids"]] == oracle(adata.X.toarray(), renamed, vocabulary, 2048)[0]
    assert "read backwards" in caplog.text and "1 ambiguous" in caplog.text


def test_symbols_against_a_vocabulary_of_ensembl_ids_map_forwards():
    adata, symbols, name_map, _ = _symbol_vocabulary_case()
    ensembl = [str(g).split(".")[0] for g in adata.var_names]
    adata.var_names = symbols
    vocabulary = {"<pad>": 0, **{g: i + 1 for i, g in enumerate(ensembl)}}
    with pytest.raises(DataError, match="look like gene symbols"):
        tokenize_cellfm(adata, token_dictionary=vocabulary, show_progress=False)
    dataset, stats = tokenize_cellfm(adata, token_dictionary=vocabulary, gene_name_id_dictionary=name_map,
                                     max_genes=50, show_progress=False, return_stats=True)
    renamed = [name_map.get(s, s) for s in symbols]  # SYM7 is in no map: it stays a symbol, unmatched
    assert [list(r) for r in dataset["input_ids"]] == oracle(adata.X.toarray(), renamed, vocabulary, 50)[0]
    assert (stats.gene_name_mapping["n_genes_mapped"], stats.gene_name_mapping["n_genes_unmapped"]) == (7, 1)


def test_a_vocabulary_mixing_symbols_and_ensembl_ids_takes_the_ids_it_holds():
    """A vocabulary of mostly symbols that also holds the file's Ensembl ids is not refused (the
    file's ids are found in it), and var_names can be named as the gene id column."""
    adata = make_adata(10, 15, seed=2)
    ensembl = [f"ENSG{i:011d}" for i in range(10)]
    adata.var_names = ensembl + [f"SYM{i}" for i in range(5)]
    vocabulary = {"<pad>": 0, **{f"SYM{i}": i + 1 for i in range(30)},
                  **{g: 31 + i for i, g in enumerate(ensembl)}}
    dataset = tokenize_cellfm(adata, token_dictionary=vocabulary, max_genes=50, show_progress=False)
    assert [list(r) for r in dataset["input_ids"]] == oracle(adata.X.toarray(), list(adata.var_names), vocabulary,
                                                             50)[0]
    adata.var["ensembl_id"] = ensembl + [f"ENSG{i:011d}" for i in range(10, 15)]
    by_index = tokenize_cellfm(adata, token_dictionary=vocabulary, gene_id_column="var_names", max_genes=50,
                               show_progress=False)
    assert by_index["input_ids"] == dataset["input_ids"]
