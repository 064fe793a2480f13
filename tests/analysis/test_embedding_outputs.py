"""What ``geneformer-peft embed`` writes: AnnData a scanpy user continues from, tables,
the quality report and the plots; and its errors."""
from __future__ import annotations

import json
import sys

import numpy as np
import pandas as pd
import pytest

from analysis_factories import make_cells, save_cells, token_dictionary
from bert_factories import ours_tiny_model
from geneformer_peft.analysis.embedding_quality import embedding_quality
from geneformer_peft.analysis.figures import UMAP_MISSING, plot_label_heatmap, plot_volcano, umap_coordinates
from geneformer_peft.cli import main


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """Our tiny BERT (perturbed weights) saved as a pretrained checkpoint with a V2 vocabulary."""
    import pickle

    directory = tmp_path_factory.mktemp("ckpt")
    ours_tiny_model("BertForMaskedLM", seed=2).save_pretrained(directory)
    with open(directory / "token_dictionary.pkl", "wb") as fh:
        pickle.dump(token_dictionary(), fh)
    return directory


@pytest.fixture(scope="module")
def cells_v2(tmp_path_factory):
    return save_cells(make_cells(12, v2=True, seed=5), tmp_path_factory.mktemp("cells") / "v2.dataset")


def _embed(checkpoint, cells, output, *extra):
    return main(["embed", "--model_path", str(checkpoint), "--input", str(cells), "--output", str(output),
                 "--device", "cpu", "--no_plots", *extra])


def test_h5ad_has_embeddings_obs_and_provenance(checkpoint, cells_v2, tmp_path):
    import anndata

    out = tmp_path / "cells.h5ad"
    assert _embed(checkpoint, cells_v2, out, "--emb_layer", "0", "--batch_size", "5") == 0
    adata = anndata.read_h5ad(out)
    assert adata.obsm["X_geneformer"].shape == (12, 32)
    assert list(adata.obs.columns) == ["input_row", "length", "cell_type", "batch", "n_counts"]
    assert adata.obs["input_row"].tolist() == list(range(12))  # input order, despite length grouping
    assert adata.obs["cell_type"].astype(str).tolist() == make_cells(12, v2=True, seed=5)["cell_type"]
    uns = adata.uns["geneformer_peft"]
    assert uns["emb_mode"] == "cell" and int(uns["emb_layer"]) == 0 and int(uns["hidden_states_index"]) == 2
    assert uns["model_path"] == str(checkpoint) and uns["version"]
    metrics = json.loads((tmp_path / "embedding_metrics.json").read_text())
    assert set(metrics["labels"]) == {"cell_type"} and metrics["labels"]["cell_type"]["n_classes"] == 3
    # the table formats hold the same numbers
    assert _embed(checkpoint, cells_v2, tmp_path / "cells.csv", "--emb_layer", "0") == 0
    table = pd.read_csv(tmp_path / "cells.csv")
    emb = table[[f"emb_{i}" for i in range(32)]].to_numpy()
    np.testing.assert_allclose(emb, adata.obsm["X_geneformer"], atol=1e-6)
    assert _embed(checkpoint, cells_v2, tmp_path / "cells.parquet", "--emb_layer", "0") == 0
    assert pd.read_parquet(tmp_path / "cells.parquet")["cell_type"].tolist() == table["cell_type"].tolist()


def test_gene_mode_h5ad_per_label(checkpoint, cells_v2, tmp_path):
    import anndata

    out = tmp_path / "genes.h5ad"
    assert _embed(checkpoint, cells_v2, out, "--emb_mode", "gene", "--gene_per_label") == 0
    adata = anndata.read_h5ad(out)
    data = make_cells(12, v2=True, seed=5)
    expressed = {t for row in data["input_ids"] for t in row[1:-1]}
    vocab = {v: k for k, v in token_dictionary().items()}
    assert sorted(adata.obs_names) == sorted(vocab[t] for t in expressed)
    assert adata.X.shape == (len(expressed), 32)
    for label in ("A", "B", "C"):
        n = adata.obs[f"n_cells_{label}"].to_numpy()
        layer = adata.layers[f"label={label}"]
        assert np.isnan(layer[n == 0]).all() and np.isfinite(layer[n > 0]).all()
    n_all = adata.obs["n_cells"].to_numpy()
    assert (n_all == sum(adata.obs[f"n_cells_{x}"].to_numpy() for x in "ABC")).all()
    assert _embed(checkpoint, cells_v2, tmp_path / "genes.csv", "--emb_mode", "gene") == 0
    table = pd.read_csv(tmp_path / "genes.csv")
    assert set(table["label"]) == {"all"} and len(table) == len(expressed)


def test_embed_errors_exit_2(checkpoint, cells_v2, tmp_path):
    v1 = save_cells(make_cells(4, v2=False), tmp_path / "v1.dataset")
    assert _embed(checkpoint, v1, tmp_path / "x.h5ad", "--emb_mode", "cls") == 2  # no <cls> in V1 inputs
    assert _embed(checkpoint, cells_v2, tmp_path / "x.npy") == 2  # unknown format
    assert _embed(checkpoint, cells_v2, tmp_path / "x.h5ad", "--label_column", "tissue") == 2
    assert _embed(checkpoint, cells_v2, tmp_path / "x.h5ad", "--emb_layer", "-3") == 2
    assert not (tmp_path / "x.h5ad").exists()


def test_random_init_baseline_differs(checkpoint, cells_v2, tmp_path):
    import anndata

    assert _embed(checkpoint, cells_v2, tmp_path / "a.h5ad") == 0
    assert _embed(checkpoint, cells_v2, tmp_path / "r.h5ad", "--random_init") == 0
    a, r = (anndata.read_h5ad(tmp_path / f"{n}.h5ad") for n in "ar")
    assert r.uns["geneformer_peft"]["model_kind"] == "random"
    assert np.abs(a.obsm["X_geneformer"] - r.obsm["X_geneformer"]).max() > 1e-2


def test_quality_separates_clusters_from_noise():
    rng = np.random.default_rng(0)
    labels = np.repeat(["x", "y", "z"], 20)
    centres = {"x": 0.0, "y": 5.0, "z": 10.0}
    clustered = np.stack([rng.normal(centres[lab], 0.3, size=4) for lab in labels])
    good = embedding_quality(clustered, labels)
    assert good["knn_accuracy"] == 1.0 and good["silhouette"] > 0.8 and good["n_folds"] == 5
    assert len(good["knn_accuracy_folds"]) == 5
    noise = embedding_quality(rng.normal(size=(60, 4)), labels)
    assert noise["knn_accuracy"] < 0.6 and abs(noise["silhouette"]) < 0.1
    few = embedding_quality(clustered[:5], ["x", "x", "x", "y", "z"])
    assert few["knn_accuracy"] is None and "smallest class" in few["note"]


def test_plots_are_written(tmp_path):
    pytest.importorskip("matplotlib")
    rng = np.random.default_rng(1)
    labels = np.repeat(["T cell", "B cell"], 10)
    path = plot_label_heatmap(rng.normal(size=(20, 8)), labels, tmp_path / "h.png", label_name="cell_type",
                              title="model, emb_layer -1")
    assert path.is_file() and path.stat().st_size > 1000
    stats = pd.DataFrame({"gene": ["g1", "g2", "g3"], "effect": [-0.1, 0.0, 0.05], "p_value": [1e-4, 0.5, 0.01],
                          "fdr": [3e-4, 0.5, 0.015]})
    assert plot_volcano(stats, tmp_path / "v.png", effect_column="effect", effect_label="effect",
                        title="delete").is_file()


def test_umap_absent_gives_a_clear_message(monkeypatch, caplog):
    monkeypatch.setitem(sys.modules, "umap", None)  # import umap -> ImportError
    with caplog.at_level("WARNING"):
        assert umap_coordinates(np.zeros((5, 3))) is None
    assert UMAP_MISSING in caplog.text and "pip install umap-learn" in caplog.text

