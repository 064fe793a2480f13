"""Gene symbols to Ensembl ids: id kinds, symbol maps, tokenize --gene_name_id_dictionary (issue 21, point 2)."""

from __future__ import annotations

import json
import logging
import pickle

import datasets
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from data_factories import SHARED_DATA, gene_ids, make_adata, make_vocab
from geneformer_peft.cli import main
from geneformer_peft.data.gene_ids import (
    check_gene_id_kinds,
    classify_gene_ids,
    map_gene_names,
    read_gene_name_map,
    strip_version,
)
from geneformer_peft.data.rank_value import tokenize_anndata
from geneformer_peft.errors import DataError

CELLBENCH = SHARED_DATA / "cellbench_celseq2_5cl.h5ad"
V1_TOKENS = SHARED_DATA / "geneformer_v1_token_dictionary.pkl"
V1_MEDIANS = SHARED_DATA / "geneformer_v1_gene_median_dictionary.pkl"


def _tokenize(adata, tokens, medians, **kwargs):
    kwargs.setdefault("show_progress", False)
    return tokenize_anndata(adata, token_dictionary=tokens, gene_median_dictionary=medians, **kwargs)


def _with_var(adata, names):
    import anndata

    return anndata.AnnData(X=adata.X.copy(), obs=adata.obs.copy(), var=pd.DataFrame(index=list(names)))


# -- id kinds -------------------------------------------------------------------------------
def test_classify_gene_ids_counts_kinds_and_version_suffixes():
    ids = ["ENSG00000000003.14", "ENSG00000141510", "ENSMUSG00000059552", "ENSMUSG00000059552.7", "ENSDARG00000002",
           "TP53", "Actb", "ERCC-00002", "ENSGSYN00000000001", "ENSG0000014151X", "ensg00000141510", ""]
    kinds = classify_gene_ids(ids)
    assert (kinds.n_human, kinds.n_mouse, kinds.n_other_ensembl, kinds.n_symbol) == (2, 2, 1, 7)
    assert kinds.n_total == 12 and kinds.n_ensembl == 5 and kinds.kind == "mixed"
    assert kinds.symbol_fraction == pytest.approx(7 / 12)
    assert kinds.examples["human"] == ("ENSG00000000003.14", "ENSG00000141510")
    assert kinds.examples["symbol"] == ("TP53", "Actb", "ERCC-00002", "ENSGSYN00000000001", "ENSG0000014151X")
    assert classify_gene_ids(["ENSG1.2", "ENSMUSG3"]).kind == "ensembl"
    assert classify_gene_ids(["TP53"]).kind == classify_gene_ids([]).kind == "symbol"
    with pytest.raises(AttributeError):
        kinds.n_human = 0  # frozen
    assert strip_version("ENSG00000000003.14") == "ENSG00000000003"
    assert strip_version("HLA-A.1") == "HLA-A.1" and strip_version("ENSG3") == "ENSG3"


def test_mostly_ensembl_with_spike_ins_is_not_refused():
    adata = make_adata(10, 20)
    names = list(adata.var_names)
    names[:9] = [f"ERCC-{i:05d}" for i in range(9)]  # 45% non-Ensembl: below the refusal line
    tokens, medians = make_vocab(list(adata.var_names))
    dataset, stats = _tokenize(_with_var(adata, names), tokens, medians, return_stats=True)
    assert dataset.num_rows == 10 and stats.n_genes_matched == 11 and stats.gene_name_mapping is None


def test_symbols_without_map_refused_naming_file_column_examples_share_and_hint(tmp_path):
    adata = make_adata(10, 20)
    adata.var["symbol"] = [f"GENE{i}" for i in range(19)] + [adata.var_names[19]]
    path = tmp_path / "cells.h5ad"
    adata.write_h5ad(path)
    tokens, medians = make_vocab(gene_ids(20))
    with pytest.raises(DataError) as info:
        _tokenize(str(path), tokens, medians, gene_id_column="symbol")
    message = str(info.value)
    for part in ("cells.h5ad", "var['symbol']", "95.0% of the 20 gene ids", "'GENE0', 'GENE1'",
                 "--gene_name_id_dictionary", "gene_name_id_dict.pkl", "ENSG000000000"):
        assert part in message, part
    # the same symbols against a vocabulary of symbols are fine (e.g. one built with --build_vocab)
    symbol_tokens = {"<pad>": 0, "<mask>": 1, **{f"GENE{i}": i + 2 for i in range(19)}}
    symbol_medians = {f"GENE{i}": 1.0 for i in range(19)}
    assert _tokenize(str(path), symbol_tokens, symbol_medians, gene_id_column="symbol").num_rows == 10
    with pytest.raises(DataError, match=r"gene_name_id_dictionary <dict>: maps gene symbols to Ensembl ids, but the "
                                        r"token dictionary holds none"):
        _tokenize(str(path), symbol_tokens, symbol_medians, gene_id_column="symbol",
                  gene_name_id_dictionary={"GENE0": "ENSG00000000001"})


def test_check_gene_id_kinds_is_reusable():
    kinds = check_gene_id_kinds(["ENSG1", "TP53"], ["<pad>", "ENSG1"], source_name="f", gene_id_field="var_names")
    assert kinds.kind == "mixed"  # half symbols: not above the line
    with pytest.raises(DataError, match=r"f: 66\.7% of the 3 gene ids in var_names are not Ensembl ids"):
        check_gene_id_kinds(["ENSG1", "TP53", "MYC"], ["<pad>", "ENSG1"], source_name="f", gene_id_field="var_names")


# -- symbol-named counts give exactly the Ensembl-named dataset --------------------------------
def _symbol_world(n_cells=40, seed=7):
    """Counts under Ensembl ids, and the same counts under symbols with a map.

    Symbol file columns: S0..S23 (mapped to genes 0..23), S1ALT and S6ALT (second symbols of
    genes 1 and 6), an Ensembl id given as is (gene 24) and one with a version suffix (gene 25),
    UNMAPPED1/2 (not in the map). Genes 3, 8, ... are missing from the vocabulary.
    """
    base = make_adata(n_cells, 30, seed=seed, density=0.6)
    X = base.X.toarray().astype(np.float64)
    ens = gene_ids(26)
    symbol_cols = [X[:, i] for i in range(24)] + [X[:, 26], X[:, 27], X[:, 24], X[:, 25], X[:, 28], X[:, 29]]
    names = [f"S{i}" for i in range(24)] + ["S1ALT", "S6ALT", ens[24], ens[25] + ".3", "UNMAPPED1", "UNMAPPED2"]
    name_map = {f"S{i}": ens[i] for i in range(24)} | {"S1ALT": ens[1], "S6ALT": ens[6]}
    import anndata

    symbols = anndata.AnnData(X=sp.csr_matrix(np.column_stack(symbol_cols).astype(np.float32)), obs=base.obs.copy(),
                              var=pd.DataFrame(index=names))
    # reference: the counts pre-summed under each Ensembl id; unmapped genes keep their names
    summed = X[:, :26].copy()
    summed[:, 1] += X[:, 26]
    summed[:, 6] += X[:, 27]
    reference = anndata.AnnData(X=sp.csr_matrix(np.column_stack([summed, X[:, 28], X[:, 29]]).astype(np.float32)),
                                obs=base.obs.copy(), var=pd.DataFrame(index=ens + ["UNMAPPED1", "UNMAPPED2"]))
    tokens, medians = make_vocab(ens, seed=seed, drop_every=5)
    return symbols, reference, name_map, tokens, medians


@pytest.mark.parametrize("model_version, model_input_size", [("V1", 2048), ("V1", 9), ("V2", 12)])
def test_symbol_map_gives_exactly_the_ensembl_dataset(tmp_path, model_version, model_input_size):
    symbols, reference, name_map, tokens, medians = _symbol_world()
    tokens |= {"<cls>": len(tokens), "<eos>": len(tokens) + 1}
    symbols.obs["filter_pass"] = [0 if i % 7 == 0 else 1 for i in range(symbols.n_obs)]
    reference.obs["filter_pass"] = symbols.obs["filter_pass"]
    path = tmp_path / "symbols.h5ad"
    symbols.write_h5ad(path)
    common = dict(label_column="cell_type", keep_columns=["batch"], model_version=model_version,
                  model_input_size=model_input_size)
    expected = _tokenize(reference, tokens, medians, **common)
    got = _tokenize(str(path), tokens, medians, gene_name_id_dictionary=name_map, chunk_size=6, **common)
    assert got.features == expected.features
    assert got.to_dict() == expected.to_dict()
    # the sums matter: without S1ALT/S6ALT's counts on genes 1 and 6 some cell ranks differently
    assert {gene_ids(26)[1], gene_ids(26)[6]} <= set(tokens)
    without_alt = dict(name_map)
    del without_alt["S1ALT"], without_alt["S6ALT"]
    differs = _tokenize(str(path), tokens, medians, gene_name_id_dictionary=without_alt, chunk_size=6, **common)
    assert differs["input_ids"] != expected["input_ids"]


def test_mapping_figures_are_computed_directly(tmp_path, caplog):
    symbols, _, name_map, tokens, medians = _symbol_world()
    keep = np.array([i % 3 != 0 for i in range(symbols.n_obs)])
    symbols.obs["keep"] = np.where(keep, "yes", "no")
    map_path = tmp_path / "map.csv"
    map_path.write_text("symbol,ensembl_id\n" + "".join(f"{k},{v}\n" for k, v in name_map.items()))
    caplog.set_level(logging.INFO, logger="geneformer_peft")
    _, stats = _tokenize(symbols, tokens, medians, gene_name_id_dictionary=map_path, obs_filter={"keep": "yes"},
                         return_stats=True)
    X = symbols.X.toarray()[keep]
    names = list(symbols.var_names)
    mapped = [i for i, g in enumerate(names) if g in name_map]
    ensembl = [names.index(gene_ids(26)[24]), names.index(gene_ids(26)[25] + ".3")]
    unmapped = [names.index("UNMAPPED1"), names.index("UNMAPPED2")]
    col = X.sum(axis=0)
    figures = stats.gene_name_mapping
    assert figures["gene_name_id_dictionary"] == str(map_path)
    assert (figures["n_genes_mapped"], figures["n_genes_ensembl"], figures["n_genes_unmapped"]) == (26, 2, 2)
    assert figures["n_ensembl_ids_from_several_genes"] == 2
    assert figures["mapped_count_fraction"] == pytest.approx(col[mapped + ensembl].sum() / X.sum(), rel=1e-12)
    expected_top = sorted(((names[i], int(col[i])) for i in unmapped), key=lambda t: (-t[1], t[0]))
    assert [(g["gene"], g["counts"]) for g in figures["top_unmapped_genes"]] == expected_top
    assert json.loads(stats.to_json())["gene_name_mapping"] == figures
    # genes matched to the vocabulary: the mapped + given Ensembl ids that it holds, each once
    in_vocab = {g for g in gene_ids(26) if g in tokens}
    assert stats.n_genes_matched == len(in_vocab)
    assert "26 genes mapped to Ensembl ids, 2 given as Ensembl ids, 2 unmapped" in caplog.text


def test_top_unmapped_genes_are_the_20_highest_with_counts(caplog):
    adata = make_adata(30, 40, seed=4, density=0.8)
    X = adata.X.toarray()
    X[:, 39] = 0  # an unmapped gene without counts is not listed
    adata.X = sp.csr_matrix(X)
    names = [f"S{i}" for i in range(40)]
    name_map = {f"S{i}": g for i, g in enumerate(gene_ids(10))}
    tokens, medians = make_vocab(gene_ids(10))
    caplog.set_level(logging.WARNING, logger="geneformer_peft")
    _, stats = _tokenize(_with_var(adata, names), tokens, medians, gene_name_id_dictionary=name_map,
                         return_stats=True)
    col = X.sum(axis=0)
    expected = sorted(((names[i], int(col[i])) for i in range(10, 39)), key=lambda t: (-t[1], t[0]))[:20]
    top = stats.gene_name_mapping["top_unmapped_genes"]
    assert [(g["gene"], g["counts"]) for g in top] == expected and len(top) == 20
    assert stats.gene_name_mapping["n_genes_unmapped"] == 30
    assert "unmapped holding" in caplog.text  # most counts unmapped: a WARNING


def test_versioned_ids_in_data_and_map():
    adata = make_adata(12, 6, seed=9)
    ens = list(adata.var_names)
    tokens, medians = make_vocab(ens, seed=9)
    names = [ens[0] + ".14", ens[1] + ".2", "A", "B", "C", ens[5]]
    name_map = {"A": ens[2] + ".5", "B": ens[3], "C": ens[4] + ".1"}
    mapping = map_gene_names(names, name_map)
    assert list(mapping.ensembl_ids) == ens and list(mapping.status) == ["ensembl"] * 2 + ["mapped"] * 3 + ["ensembl"]
    got = _tokenize(_with_var(adata, names), tokens, medians, gene_name_id_dictionary=name_map)
    assert got.to_dict() == _tokenize(adata, tokens, medians).to_dict()


# -- reading maps ------------------------------------------------------------------------------
@pytest.mark.parametrize("name, text", [
    ("map.csv", "symbol,ensembl_id\nTP53,ENSG00000141510\nMYC,ENSG00000136997\n"),
    ("map.tsv", "TP53\tENSG00000141510\nMYC\tENSG00000136997\n\n"),
    ("map.txt", "gene name\tgene id\n TP53 \t ENSG00000141510\nMYC\tENSG00000136997\nMYC\tENSG00000136997\n"),
    ("map.csv", '"TP53",ENSG00000141510\r\n"MYC",ENSG00000136997\r\n'),
], ids=["csv-header", "tsv-no-header", "txt-tab-detected-repeat-ok", "quoted-crlf"])
def test_read_csv_and_tsv_maps(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text)
    assert read_gene_name_map(path) == {"TP53": "ENSG00000141510", "MYC": "ENSG00000136997"}


def test_read_pickle_map_with_numpy_strings(tmp_path):
    path = tmp_path / "gene_name_id_dict.pkl"
    path.write_bytes(pickle.dumps({"TP53": "ENSG00000141510", np.str_("MYC"): np.str_("ENSG00000136997")}))
    assert read_gene_name_map(path) == {"TP53": "ENSG00000141510", "MYC": "ENSG00000136997"}


@pytest.mark.parametrize("name, text, expected", [
    ("m.csv", "symbol,ensembl_id\nTP53,ENSG00000141510,extra\n", r"m\.csv: line 2 has 3 fields.*expected 2"),
    ("m.tsv", "TP53\tENSG00000141510\nMYC\n", r"m\.tsv: line 2 has 1 fields.*separated by a tab"),
    ("m.csv", "symbol,ensembl_id\nTP53,not-an-id\n", r"m\.csv: line 2: gene 'TP53' maps to 'not-an-id'.*Ensembl"),
    ("m.csv", "ENSG00000141510,TP53\nENSG00000136997,MYC\n", r"line 1: gene 'ENSG00000141510' maps to 'TP53'.*other way"),
    ("m.csv", "", r"m\.csv: the gene name map is empty"),
    ("m.csv", "symbol,ensembl_id\n", r"m\.csv: the gene name map is empty"),
], ids=["three-fields", "one-field", "bad-id", "reversed", "empty", "header-only"])
def test_malformed_maps_refused_naming_file_and_line(tmp_path, name, text, expected):
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(DataError, match=expected):
        read_gene_name_map(path)


def test_ambiguous_symbols_and_entries_without_a_symbol_are_left_unmapped(tmp_path, caplog):
    """As in BioMart exports: a symbol with two Ensembl ids, and Ensembl ids without a symbol."""
    path = tmp_path / "biomart.csv"
    path.write_text("Gene name,Gene stable ID\nTP53,ENSG00000141510\nY_RNA,ENSG00000201098\n,ENSG00000283633\n"
                    "MYC,ENSG00000136997\nY_RNA,ENSG00000199568\nY_RNA,ENSG00000200997\n")
    with caplog.at_level(logging.WARNING):
        assert read_gene_name_map(path) == {"TP53": "ENSG00000141510", "MYC": "ENSG00000136997"}
    assert "1 symbols map to several Ensembl ids and are left unmapped" in caplog.text and "Y_RNA" in caplog.text
    with pytest.raises(DataError, match="the gene name map is empty"):
        path.write_text("Y_RNA,ENSG00000201098\nY_RNA,ENSG00000199568\n")
        read_gene_name_map(path)


def test_bad_pickle_maps_refused(tmp_path):
    path = tmp_path / "gene_name_id_dict.pkl"
    path.write_bytes(pickle.dumps({}))
    with pytest.raises(DataError, match=r"gene_name_id_dict\.pkl: the gene name map is empty"):
        read_gene_name_map(path)
    path.write_bytes(pickle.dumps({"TP53": 7}))
    with pytest.raises(DataError, match=r"gene_name_id_dict\.pkl: entry 'TP53': gene 'TP53' maps to 7"):
        read_gene_name_map(path)
    with pytest.raises(DataError, match=r"nope\.pkl: gene name map file does not exist"):
        read_gene_name_map(tmp_path / "nope.pkl")


class _Planted:
    """Unpickling this calls a function of the attacker's choice (creates a marker file)."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        from pathlib import Path

        return (Path.touch, (self.marker,))


def test_malicious_pickle_map_runs_nothing(tmp_path):
    marker = tmp_path / "ran"
    path = tmp_path / "gene_name_id_dict.pkl"
    path.write_bytes(pickle.dumps({"TP53": "ENSG00000141510", "MYC": _Planted(marker)}))
    pickle.loads(path.read_bytes())  # the plain unpickler runs it: the test can fail
    assert marker.exists()
    marker.unlink()
    with pytest.raises(DataError, match=r"gene_name_id_dict\.pkl: the pickle refers to pathlib"):
        read_gene_name_map(path)
    adata = make_adata(5, 5)
    tokens, medians = make_vocab(list(adata.var_names))
    with pytest.raises(DataError, match=r"gene_name_id_dict\.pkl: the pickle refers to pathlib"):
        _tokenize(adata, tokens, medians, gene_name_id_dictionary=path)
    assert not marker.exists()


# -- command line -------------------------------------------------------------------------------
@pytest.fixture
def cli_inputs(tmp_path):
    symbols, reference, name_map, tokens, medians = _symbol_world(30, seed=3)
    symbols.write_h5ad(tmp_path / "symbols.h5ad")
    reference.write_h5ad(tmp_path / "ensembl.h5ad")
    (tmp_path / "tokens.pkl").write_bytes(pickle.dumps(tokens))
    (tmp_path / "medians.pkl").write_bytes(pickle.dumps(medians))
    (tmp_path / "map.pkl").write_bytes(pickle.dumps(name_map))
    return tmp_path


def _argv(d, name, out, *extra):
    return ["tokenize", "--input", str(d / name), "--output", str(d / out), "--token_dictionary", str(d / "tokens.pkl"),
            "--gene_median_dictionary", str(d / "medians.pkl"), "--label_column", "cell_type", "--no_progress", *extra]


def test_cli_symbols_without_map_exit_2_then_with_map_same_dataset(cli_inputs, caplog):
    d = cli_inputs
    assert main(_argv(d, "symbols.h5ad", "s.dataset")) == 2
    assert not (d / "s.dataset").exists()
    for part in ("symbols.h5ad", "var_names", "'S0', 'S1'", "% of the 30 gene ids", "--gene_name_id_dictionary"):
        assert part in caplog.text, part
    assert main(_argv(d, "symbols.h5ad", "s.dataset", "--gene_name_id_dictionary", str(d / "map.pkl"))) == 0
    assert main(_argv(d, "ensembl.h5ad", "e.dataset")) == 0
    got, expected = datasets.load_from_disk(str(d / "s.dataset")), datasets.load_from_disk(str(d / "e.dataset"))
    assert got.to_dict() == expected.to_dict()
    report = json.loads(got.info.description)["gene_name_mapping"]
    assert report["gene_name_id_dictionary"] == str(d / "map.pkl") and report["n_genes_unmapped"] == 2
    assert json.loads(expected.info.description)["gene_name_mapping"] is None


def test_cli_map_refused_with_build_vocab_and_binned(cli_inputs, caplog):
    d = cli_inputs
    argv = ["tokenize", "--input", str(d / "symbols.h5ad"), "--output", str(d / "x.dataset"), "--no_progress",
            "--gene_name_id_dictionary", str(d / "map.pkl")]
    assert main(argv + ["--build_vocab", str(d / "vocab")]) == 2
    assert "--build_vocab builds the vocabulary from the file's own gene ids" in caplog.text
    (d / "panel.txt").write_text("S0\nS1\n")
    assert main(argv + ["--encoding", "binned", "--gene_panel", str(d / "panel.txt")]) == 2
    assert "--gene_name_id_dictionary applies to the rank value encoding" in caplog.text
    assert not (d / "x.dataset").exists() and not (d / "vocab").exists()


# -- real data ----------------------------------------------------------------------------------
def test_cellbench_renamed_to_symbols_gives_the_same_dataset():
    if not (CELLBENCH.exists() and V1_TOKENS.exists() and V1_MEDIANS.exists()):
        pytest.skip(f"real data not found under {SHARED_DATA}")
    import anndata

    from geneformer_peft.data.vocab import load_gene_median_dictionary, load_token_dictionary

    adata = anndata.read_h5ad(CELLBENCH)
    adata = adata[(adata.obs["demuxlet_cls"] == "SNG").to_numpy()][:60].copy()
    tokens, medians = load_token_dictionary(V1_TOKENS), load_gene_median_dictionary(V1_MEDIANS)
    ens = list(adata.var_names)
    symbols = [f"SYM{i}" for i in range(len(ens))]
    unmapped = np.array([i % 10 == 0 or not g.startswith("ENSG") for i, g in enumerate(ens)])  # ERCC spike-ins too
    name_map = {s: g for s, g, u in zip(symbols, ens, unmapped) if not u}
    with pytest.raises(DataError, match=r"100\.0% of the 16074 gene ids in var_names are not Ensembl ids"):
        _tokenize(_with_var(adata, symbols), tokens, medians)
    got, stats = _tokenize(_with_var(adata, symbols), tokens, medians, gene_name_id_dictionary=name_map,
                           label_column="cell_type", return_stats=True)
    reference = _with_var(adata, [s if u else g for s, g, u in zip(symbols, ens, unmapped)])
    expected = _tokenize(reference, tokens, medians, label_column="cell_type")
    assert got.to_dict() == expected.to_dict()
    assert got.num_rows == 60 and stats.n_genes_matched > 10_000 and min(got["length"]) > 500
    X = adata.X.toarray() if sp.issparse(adata.X) else np.asarray(adata.X)
    col = X.sum(axis=0, dtype=np.float64)
    assert stats.gene_name_mapping["mapped_count_fraction"] == pytest.approx(col[~unmapped].sum() / col.sum())
    assert stats.gene_name_mapping["n_genes_unmapped"] == int(unmapped.sum())
    assert stats.gene_name_mapping["top_unmapped_genes"][0]["counts"] == int(col[unmapped].max())
