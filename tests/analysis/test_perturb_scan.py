"""Perturbation scans: every number equals a direct computation with ``transformers``;
chunked results resume; absent and unknown genes; the statistics."""
from __future__ import annotations

import json
import pickle

import numpy as np
import pandas as pd
import pytest
import torch

pytest.importorskip("transformers", reason="the reference is HuggingFace transformers")

from analysis_factories import gene_id, hf_checkpoint, make_cells, save_cells, token_dictionary  # noqa: E402
from geneformer_peft.analysis import perturbation as perturbation_module  # noqa: E402
from geneformer_peft.analysis.perturbation_stats import benjamini_hochberg, perturbation_statistics  # noqa: E402
from geneformer_peft.analysis.runs import run_perturb  # noqa: E402
from geneformer_peft.cli import main  # noqa: E402
from geneformer_peft.errors import DataError  # noqa: E402

ATOL = 1e-5
N_CELLS = 6


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("perturb")
    hf = hf_checkpoint(root / "ckpt")
    data = make_cells(N_CELLS, v2=True, seed=7, min_genes=6, max_genes=14, always=(20,))
    save_cells(data, root / "cells.dataset")
    return root, hf, data


@torch.no_grad()
def ref_embeddings(hf, tokens, layer=-1):
    """(cell mean over genes, per-gene hidden states) of one V2 cell at ``layer`` with HF."""
    ids = torch.tensor([list(tokens)])
    h = hf(input_ids=ids, attention_mask=torch.ones_like(ids), output_hidden_states=True).hidden_states
    genes = h[hf.config.num_hidden_layers + layer][0, 1:-1].double()
    return genes.mean(0), genes


def cos(a, b):
    return float(torch.nn.functional.cosine_similarity(a, b, dim=0))


def _run(setup, out, **kwargs):
    root, _, _ = setup
    kwargs.setdefault("device", "cpu")
    kwargs.setdefault("plots", False)
    return run_perturb(root / "ckpt", root / "cells.dataset", out, **kwargs)


def test_delete_all_matches_direct_computation(setup, tmp_path):
    _, hf, data = setup
    out = _run(setup, tmp_path / "scan", genes=["all"], perturb_type="delete", emb_mode="cell_and_gene",
               chunk_cells=4, batch_size=5, n_null=3)
    results = out["results"]
    vocab = token_dictionary()
    n_expected = sum(len(t) - 2 for t in data["input_ids"])
    assert len(results) == n_expected and not results["is_null"].any()
    assert (results.groupby("cell")["null_sample"].sum() == 3).all()
    shifts = pd.read_csv(out["paths"]["gene_shifts"]).set_index(["perturbed", "affected_gene"])
    pair_ref: dict = {}
    for row, tokens in enumerate(data["input_ids"]):
        before, before_genes = ref_embeddings(hf, tokens)
        genes = tokens[1:-1]
        for r, t in enumerate(genes):
            after, after_genes = ref_embeddings(hf, [2] + genes[:r] + genes[r + 1:] + [3])
            got = results[(results["cell"] == row) & (results["perturbed"] == gene_id(t - 4))]["cosine_sim"]
            assert len(got) == 1
            assert abs(float(got.iloc[0]) - cos(after, before)) <= ATOL
            for j, other in enumerate(genes[:r] + genes[r + 1:]):
                src = j if j < r else j + 1
                key = (gene_id(t - 4), gene_id(other - 4))
                pair_ref.setdefault(key, []).append(cos(after_genes[j], before_genes[src]))
    assert len(shifts) == len(pair_ref)
    for key, values in pair_ref.items():
        assert shifts.loc[key, "n_cells"] == len(values)
        assert abs(shifts.loc[key, "mean_cosine_sim"] - np.mean(values)) <= ATOL
    assert vocab[gene_id(16)] == 20  # token 20 is in every cell
    stats = out["stats"].set_index("gene")
    assert stats.loc[gene_id(16), "n_cells"] == N_CELLS


def test_states_and_overexpress_match_direct_computation(setup, tmp_path):
    _, hf, data = setup
    states = {"state_key": "cell_type", "start_state": "A", "goal_state": "B", "alt_states": ["C"]}
    genes = [gene_id(30), gene_id(16)]
    out = _run(setup, tmp_path / "scan", genes=genes, perturb_type="overexpress", combination=True,
               cell_states_to_model=json.dumps(states), emb_layer=0, n_null=2)
    results = out["results"]
    labels = np.array(data["cell_type"])
    means = {s: torch.stack([ref_embeddings(hf, t, 0)[0] for t, lab in zip(data["input_ids"], labels) if lab == s]
                            ).mean(0) for s in ("B", "C")}
    real = results[~results["is_null"]]
    assert sorted(real["cell"]) == [i for i in range(N_CELLS) if labels[i] == "A"]
    for _, rec in real.iterrows():
        tokens = data["input_ids"][rec["cell"]]
        kept = [t for t in tokens[1:-1] if t not in (34, 20)]
        after_tokens = [2, 34, 20] + kept + [3]  # overexpressed in the listed order; 34 inserted if absent
        before = ref_embeddings(hf, tokens, 0)[0]
        after = ref_embeddings(hf, after_tokens[:64], 0)[0]
        assert abs(rec["cosine_sim"] - cos(after, before)) <= ATOL
        for s in ("B", "C"):
            assert abs(rec[f"shift_to_{s}"] - (cos(after, means[s]) - cos(before, means[s]))) <= ATOL
    assert out["summary"]["measure"] == "shift_to_B"
    assert out["stats"]["gene"].iloc[0] == "+".join(genes)


def test_classifier_probability_change(setup, tmp_path):
    """On a classifier, prob_delta_<class> = softmax(after) - softmax(before) of the full model."""
    from bert_factories import ours_tiny_model

    root, _, data = setup
    fold = root / "fold"
    clf = ours_tiny_model("BertForSequenceClassification", seed=4, num_labels=3,
                          id2label={0: "A", 1: "B", 2: "C"}, label2id={"A": 0, "B": 1, "C": 2})
    clf.save_pretrained(fold)
    with open(fold / "token_dictionary.pkl", "wb") as fh:
        pickle.dump(token_dictionary(), fh)
    out = run_perturb(fold, root / "cells.dataset", tmp_path / "scan", genes=[gene_id(16)], perturb_type="delete",
                      device="cpu", plots=False, n_null=0)
    assert out["summary"]["layers_run"] == 2 and out["summary"]["class_probabilities"] == ["A", "B", "C"]
    for _, rec in out["results"].iterrows():
        tokens = data["input_ids"][rec["cell"]]
        with torch.no_grad():
            before = clf(torch.tensor([tokens])).logits.softmax(-1)[0]
            after = clf(torch.tensor([[t for t in tokens if t != 20]])).logits.softmax(-1)[0]
        for c, name in enumerate("ABC"):
            assert abs(rec[f"prob_delta_{name}"] - float(after[c] - before[c])) <= ATOL
    skip = run_perturb(fold, root / "cells.dataset", tmp_path / "scan2", genes=[gene_id(16)], perturb_type="delete",
                       device="cpu", plots=False, n_null=0, class_probabilities=False)
    assert skip["summary"]["layers_run"] == 1 and "prob_delta_A" not in skip["results"]
    np.testing.assert_allclose(skip["results"]["cosine_sim"], out["results"]["cosine_sim"], atol=ATOL)


def test_scan_resumes_where_it_stopped(setup, tmp_path, monkeypatch):
    kwargs = dict(genes=["all"], perturb_type="inhibit", chunk_cells=2, n_null=2)
    first = _run(setup, tmp_path / "scan", **kwargs)["results"]
    chunks = sorted((tmp_path / "scan" / "chunks").glob("results_*.parquet"))
    assert len(chunks) == 3
    chunks[-1].unlink()  # as if stopped during the last chunk
    ran = []
    original = perturbation_module.PerturbationScan._run_chunk

    def counting(self, positions, absent):
        ran.append(positions.tolist())
        return original(self, positions, absent)

    monkeypatch.setattr(perturbation_module.PerturbationScan, "_run_chunk", counting)
    again = _run(setup, tmp_path / "scan", **kwargs)["results"]
    assert ran == [[4, 5]]
    pd.testing.assert_frame_equal(first, again)
    with pytest.raises(DataError, match="holds a scan with other settings"):
        _run(setup, tmp_path / "scan", genes=["all"], perturb_type="activate", chunk_cells=2, n_null=2)
    assert len(_run(setup, tmp_path / "scan", overwrite=True, genes=["all"], perturb_type="activate",
                    chunk_cells=2, n_null=2)["results"]) == len(first)


def test_absent_gene_is_reported_and_unknown_gene_is_an_error(setup, tmp_path):
    data = setup[2]
    expressed = {t for row in data["input_ids"] for t in row}
    absent = next(i for i in range(95) if 4 + i not in expressed)
    out = _run(setup, tmp_path / "scan", genes=[gene_id(absent), gene_id(16)], perturb_type="delete", n_null=2)
    summary = json.loads(out["paths"]["summary"].read_text())
    assert summary["absent_everywhere"] == [gene_id(absent)]
    assert summary["n_cells_absent"][gene_id(absent)] == N_CELLS and summary["absent_action"] == "skipped"
    row = out["stats"].set_index("gene").loc[gene_id(absent)]
    assert row["n_cells"] == 0 and row["n_cells_absent"] == N_CELLS and np.isnan(row["p_value"])
    with pytest.raises(DataError, match="ENSGNOPE0000001"):
        _run(setup, tmp_path / "scan2", genes=["ENSGNOPE0000001"], perturb_type="delete")
    root = setup[0]
    code = main(["perturb", "--model_path", str(root / "ckpt"), "--input", str(root / "cells.dataset"),
                 "--output_dir", str(tmp_path / "cli"), "--perturb_type", "delete", "--genes", "ENSGNOPE0000001"])
    assert code == 2


def test_cls_mode_on_v1_is_an_error_and_filters_select_cells(setup, tmp_path):
    root = setup[0]
    save_cells(make_cells(4, v2=False, seed=1), tmp_path / "v1.dataset")
    with pytest.raises(DataError, match="<cls>"):
        run_perturb(root / "ckpt", tmp_path / "v1.dataset", tmp_path / "s", genes=["all"], perturb_type="delete",
                    emb_mode="cls", device="cpu", plots=False)
    out = _run(setup, tmp_path / "f", genes=["all"], perturb_type="delete", filters=["cell_type=B,C"], max_ncells=2)
    labels = np.array(setup[2]["cell_type"])
    assert sorted(set(out["results"]["cell"])) == [i for i in range(N_CELLS) if labels[i] in "BC"][:2]


def test_statistics_against_the_null_and_bh():
    from scipy.stats import mannwhitneyu

    rng = np.random.default_rng(0)
    rows = []
    for cell in range(20):
        for g in range(6):
            shift = 0.3 if g == 0 else 0.0  # gene g0 has an effect
            rows.append({"cell": cell, "perturbed": f"g{g}", "is_null": False, "null_sample": g >= 3,
                         "cosine_sim": 1 - abs(rng.normal(shift, 0.05))})
    results = pd.DataFrame(rows)
    stats = perturbation_statistics(results, measure="cosine_sim").set_index("gene")
    assert stats.index[0] == "g0" and stats.loc["g0", "fdr"] < 1e-3 and stats.loc["g0", "effect"] < -0.2
    g3 = results[results["perturbed"] == "g3"]["cosine_sim"]
    null = results[results["null_sample"] & (results["perturbed"] != "g3")]["cosine_sim"]
    assert stats.loc["g3", "n_null"] == len(null)  # its own perturbations are not its null
    assert abs(stats.loc["g3", "p_value"] - mannwhitneyu(g3, null, alternative="two-sided").pvalue) < 1e-12
    p = stats["p_value"].to_numpy()
    order = np.argsort(p)
    manual = np.minimum.accumulate((p[order] * len(p) / np.arange(1, len(p) + 1))[::-1])[::-1]
    np.testing.assert_allclose(benjamini_hochberg(p)[order], np.minimum(manual, 1), rtol=1e-12)
    np.testing.assert_allclose(stats["fdr"], benjamini_hochberg(p), rtol=1e-12)


def test_perturb_command_writes_every_output(setup, tmp_path, capsys):
    pytest.importorskip("matplotlib")
    root = setup[0]
    out = tmp_path / "cli"
    code = main(["perturb", "--model_path", str(root / "ckpt"), "--input", str(root / "cells.dataset"),
                 "--output_dir", str(out), "--perturb_type", "activate", "--genes", "all", "--max_ncells", "3",
                 "--emb_mode", "cell_and_gene", "--n_null", "4", "--device", "cpu"])
    assert code == 0
    for name in ("perturbations.parquet", "gene_stats.csv", "gene_shifts.csv", "volcano.png", "summary.json",
                 "scan.json"):
        assert (out / name).is_file(), name
    stats = pd.read_csv(out / "gene_stats.csv")
    assert stats["rank"].tolist() == list(range(1, len(stats) + 1))
    assert {"gene", "n_cells", "mean_cosine_sim", "null_mean", "effect", "p_value", "fdr"} <= set(stats.columns)
    assert "perturbations of 3 cells" in capsys.readouterr().out
