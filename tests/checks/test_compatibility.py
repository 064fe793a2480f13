"""The compatibility report (issue 21): each case a real user met is refused with exit 2 and a
message naming the file, the value and the way forward, or reported with numbers."""
from __future__ import annotations

import json
import logging
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest

import job_factories as jf
from geneformer_peft.cli import main

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE_CKPT = ROOT / "Pretrain_ckpts" / "geneformer-tiny-example"
SCBERT_CKPT = ROOT / "Pretrain_ckpts" / "scbert-tiny-example"
EXAMPLE_DATA = ROOT / "example_py" / "data"
EXAMPLE_TEST0 = EXAMPLE_DATA / "synthetic" / "0" / "synthetic_test0.dataset"
BINNED_TEST0 = EXAMPLE_DATA / "synthetic_binned" / "0" / "synthetic_binned_test0.dataset"
SHARED = ROOT.parent / "shared" / "data"


def _error(caplog) -> str:
    return "\n".join(r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR)


def _example_finetune(output: Path, *extra: str, model_path: Path = EXAMPLE_CKPT, dataset: str = "synthetic"):
    return main(["finetune", "--dataset_name", dataset, "--data_path", str(EXAMPLE_DATA), "--model_path",
                 str(model_path), "--output_path", str(output), "--folds", "0", "--epoch", "1", "--no_progress",
                 "--device", "cpu", "--baselines", "none", *extra])


def _write_dictionary(path: Path, dictionary: dict) -> Path:
    """A token dictionary as Geneformer ships it (a pickled dict)."""
    path.write_bytes(pickle.dumps(dictionary))
    return path


def _renamed_dictionary(path: Path) -> Path:
    """The example's dictionary with every gene renamed: same ids, no gene in common."""
    from geneformer_peft.data.vocab import is_special_token, load_token_dictionary

    vocab = load_token_dictionary(EXAMPLE_CKPT / "tokenizer.json")
    return _write_dictionary(path, {(k if is_special_token(k) else f"OTHER_{k}"): v for k, v in vocab.items()})


# ----------------------------------------------------------------------------- encoding


def test_binned_data_refused_by_every_command_of_a_geneformer_model(tmp_path, caplog):
    runs = {
        "finetune": lambda: _example_finetune(tmp_path / "ft", dataset="synthetic_binned"),
        "predict": lambda: main(["predict", "--model_path", str(EXAMPLE_CKPT), "--input", str(BINNED_TEST0),
                                 "--output", str(tmp_path / "p.csv"), "--device", "cpu"]),
        "embed": lambda: main(["embed", "--model_path", str(EXAMPLE_CKPT), "--input", str(BINNED_TEST0),
                               "--output", str(tmp_path / "e.csv"), "--device", "cpu", "--no_plots"]),
        "pretrain": lambda: main(["pretrain", "--model_path", str(EXAMPLE_CKPT), "--input", str(BINNED_TEST0),
                                  "--output_dir", str(tmp_path / "pt"), "--max_steps", "1"]),
        "check": lambda: main(["check", "--model_path", str(EXAMPLE_CKPT), "--input", str(BINNED_TEST0)]),
        "classify-genes": lambda: main(["classify-genes", "--gene_classes", str(ROOT / "docs" / "gene_classes_example.json"),
                                        "--input", str(BINNED_TEST0), "--model_path", str(EXAMPLE_CKPT),
                                        "--output_path", str(tmp_path / "cg"), "--device", "cpu"]),
        "search": lambda: main(["search", "--dataset_name", "synthetic_binned", "--data_path", str(EXAMPLE_DATA),
                                "--model_path", str(EXAMPLE_CKPT), "--space", str(ROOT / "docs" / "search_space_example.json"),
                                "--output_dir", str(tmp_path / "search"), "--n_trials", "1", "--folds", "0",
                                "--epoch", "1", "--device", "cpu", "--no_progress", "--prompt_type", "lora"]),
    }
    for command, run in runs.items():
        caplog.clear()
        assert run() == 2, command
        message = _error(caplog)
        assert "binned-encoded" in message and "rank_value" in message and "synthetic_binned_t" in message, command
    assert not any((tmp_path / name).exists() for name in ("p.csv", "e.csv", "pt"))
    assert not (tmp_path / "ft" / "Gene_token_prompt" / "synthetic_binned" / "0").exists()


def test_every_family_and_input_kind_checks(tmp_path, capsys):
    out = tmp_path / "report.json"
    assert main(["check", "--model_path", str(SCBERT_CKPT), "--input", str(EXAMPLE_DATA / "synthetic_binned"),
                 "--output", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["kind"] == "folds" and report["compatible"] and sorted(report["reports"]) == [
        f"fold {i}" for i in range(5)]
    checks = [f["check"] for f in report["reports"]["fold 0"]["findings"]]
    assert checks == ["checkpoint", "memory", "encoding", "token_ids", "labels"]
    assert main(["check", "--model_path", str(EXAMPLE_CKPT), "--input", str(EXAMPLE_TEST0), "--output", str(out),
                 "--label_column", "cell_type", "--overwrite"]) == 0
    report = json.loads(out.read_text())["reports"]["input"]
    found = {f["check"]: f for f in report["findings"]}
    assert set(found) == {"checkpoint", "memory", "encoding", "token_ids", "token_dictionary", "vocabulary",
                          "truncation", "labels"}
    assert found["vocabulary"]["details"]["gene_share_pretrained"] == 1.0
    assert "compatible: yes" in capsys.readouterr().out


def test_raw_counts_are_checked_as_tokenize_would_see_them(tmp_path):
    from geneformer_peft.data.rank_value import tokenize_anndata
    from geneformer_peft.data.synthetic import generate_counts
    from geneformer_peft.data.vocab import build_vocabulary, save_tokenizer_json, write_dictionaries

    adata = generate_counts(n_cells=40, n_genes=200, n_cell_types=2, seed=3)
    tokens, medians = build_vocabulary(adata, show_progress=False)
    ckpt = jf.make_tiny_checkpoint(tmp_path / "ckpt", vocab_size=len(tokens), max_position_embeddings=16)
    write_dictionaries(ckpt, tokens, medians)
    save_tokenizer_json(tokens, ckpt)
    adata.write_h5ad(tmp_path / "cells.h5ad")
    out = tmp_path / "r.json"
    assert main(["check", "--model_path", str(ckpt), "--input", str(tmp_path / "cells.h5ad"), "--output",
                 str(out)]) == 0
    found = {f["check"]: f for f in json.loads(out.read_text())["reports"]["input"]["findings"]}
    assert found["vocabulary"]["details"]["tokenized"]["count_share_matched"] == 1.0
    # tokenized without a cut, then measured against the model's 16 input tokens
    direct = tokenize_anndata(adata, token_dictionary=tokens, gene_median_dictionary=medians, model_input_size=10**6,
                              show_progress=False)
    lengths = np.array(direct["length"])
    assert found["truncation"]["details"]["n_cells_cut"] == int((lengths > 16).sum()) > 0
    assert found["truncation"]["details"]["genes_dropped_max"] == int(lengths.max()) - 16


# ----------------------------------------------------------------------------- vocabulary


def test_remap_onto_an_unshared_vocabulary_is_refused_and_so_is_its_data(tmp_path, caplog):
    renamed = _renamed_dictionary(tmp_path / "renamed.pkl")
    remapped = tmp_path / "remapped"
    argv = ["remap-vocab", "--model_path", str(EXAMPLE_CKPT), "--token_dictionary", str(renamed), "--output_dir",
            str(remapped)]
    assert main(argv) == 2
    assert "0 of the new vocabulary's 2000 genes keep pretrained rows" in _error(caplog) and not remapped.exists()
    assert "--allow_low_gene_overlap" in _error(caplog)
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        assert main(argv + ["--allow_low_gene_overlap"]) == 0
    assert any("2000 are new" in r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)
    record = json.loads((remapped / "vocabulary_remap.json").read_text())
    assert record["n_pretrained_genes"] == 0 and len(record["new_genes"]) == 2000
    # the example's cells carry the renamed dictionary's ids: tokenized right, but on rows never pretrained
    caplog.clear()
    assert main(["check", "--model_path", str(remapped), "--input", str(EXAMPLE_TEST0)]) == 2
    assert "none of the data's" in _error(caplog) and "OTHER_" in _error(caplog)
    caplog.clear()
    assert _example_finetune(tmp_path / "ft", model_path=remapped) == 2
    assert "has a pretrained row" in _error(caplog)
    assert main(["check", "--model_path", str(remapped), "--input", str(EXAMPLE_TEST0),
                 "--allow_low_gene_overlap"]) == 0


def test_half_shared_vocabulary_threshold(tmp_path):
    from geneformer_peft.checks.data import check_vocabulary
    from geneformer_peft.checks.report import CompatibilityReport
    from geneformer_peft.data.dataset_io import load_saved_dataset

    data = {"test": load_saved_dataset(EXAMPLE_TEST0)}
    seen = sorted({t for row in data["test"]["input_ids"] for t in row})
    for share, status in ((0.4, "refused"), (0.6, "ok")):
        pretrained = set(seen[: int(len(seen) * share)])
        report = CompatibilityReport("m", "d")
        check_vocabulary(report, data, pretrained_ids=pretrained, id_to_gene=None, special_ids={0, 1})
        finding = report["vocabulary"]
        assert finding.status == status
        assert finding.details["gene_share_pretrained"] == pytest.approx(len(pretrained) / len(seen))
        # the rank-weight share computed directly
        total = known = 0.0
        for row in data["test"]["input_ids"]:
            w = 1 / np.sqrt(np.arange(1, len(row) + 1))
            total += w.sum()
            known += w[np.isin(row, list(pretrained))].sum()
        assert finding.details["rank_weight_share_pretrained"] == pytest.approx(known / total)


# ----------------------------------------------------------------------------- dictionaries and checkpoints


def test_token_dictionaries_that_do_not_match_the_checkpoint_are_refused(tmp_path, caplog):
    from geneformer_peft.data.vocab import load_token_dictionary

    vocab = load_token_dictionary(EXAMPLE_CKPT / "tokenizer.json")
    genes = [k for k in vocab if not k.startswith("<")]
    cases = {
        "other_order": {"<pad>": 0, "<mask>": 1, **{g: 2 + i for i, g in enumerate(reversed(genes))}},
        "too_small": {k: v for k, v in vocab.items() if v < 1000},
        "no_pad": {"<mask>": 0, **{g: 1 + i for i, g in enumerate(genes)}},
    }
    for name, dictionary in cases.items():
        path = _write_dictionary(tmp_path / f"{name}.pkl", dictionary)
        caplog.clear()
        assert _example_finetune(tmp_path / name, "--token_dictionary", str(path)) == 2, name
        message = _error(caplog)
        assert f"{name}.pkl is not the dictionary the checkpoint was trained with" in message, name
        assert "tokenizer.json" in message
        if name == "no_pad":
            assert "lacks ['<pad>']" in message
        assert not (tmp_path / name / "Gene_token_prompt" / "synthetic" / "0").exists()


def test_remap_old_dictionary_contradicting_the_checkpoint_is_refused(tmp_path, caplog):
    from geneformer_peft.data.vocab import load_token_dictionary

    vocab = load_token_dictionary(EXAMPLE_CKPT / "tokenizer.json")
    genes = [k for k in vocab if not k.startswith("<")]
    permuted = {"<pad>": 0, "<mask>": 1, **{g: 2 + i for i, g in enumerate(reversed(genes))}}
    _write_dictionary(tmp_path / "old.pkl", permuted)
    assert main(["remap-vocab", "--model_path", str(EXAMPLE_CKPT), "--old_token_dictionary",
                 str(tmp_path / "old.pkl"), "--token_dictionary", str(EXAMPLE_CKPT / "tokenizer.json"),
                 "--output_dir", str(tmp_path / "out")]) == 2
    assert "contradicts the checkpoint's own" in _error(caplog) and "old.pkl" in _error(caplog)
    assert not (tmp_path / "out").exists()


def test_config_describing_other_layers_than_the_weights_is_refused(tmp_path, caplog):
    ckpt = tmp_path / "ckpt"
    shutil.copytree(EXAMPLE_CKPT, ckpt)
    config = json.loads((ckpt / "config.json").read_text())
    config["num_hidden_layers"] = 6  # as a hand-edited HF config.json: no per-layer PEFT lists
    for key in ("n_layers_conf", "mlp_adapter_conf", "space_adapter_conf"):
        config.pop(key, None)
    (ckpt / "config.json").write_text(json.dumps(config))
    assert main(["check", "--model_path", str(ckpt), "--input", str(EXAMPLE_TEST0)]) == 2
    assert "num_hidden_layers=6 but the weights hold 3 layers" in _error(caplog)
    caplog.clear()
    assert _example_finetune(tmp_path / "ft", model_path=ckpt) == 2
    assert "num_hidden_layers=6 but the weights hold 3 layers" in _error(caplog)
    assert str(ckpt / "config.json") in _error(caplog)


def test_pretrain_refuses_a_dictionary_of_another_size_unless_resized(tmp_path, caplog):
    config = ROOT / "Pretrain_ckpts" / "geneformer-6L-30M" / "config.json"
    argv = ["pretrain", "--config", str(config), "--token_dictionary", str(EXAMPLE_CKPT / "tokenizer.json"),
            "--input", str(EXAMPLE_TEST0), "--max_steps", "1", "--batch_size", "2", "--device", "cpu"]
    assert main(argv + ["--output_dir", str(tmp_path / "a")]) == 2
    message = _error(caplog)
    assert "holds 2002 tokens but the model's vocab_size is 25426" in message and "--resize_vocab" in message
    assert main(argv + ["--output_dir", str(tmp_path / "b"), "--resize_vocab"]) == 0
    assert json.loads((tmp_path / "b" / "config.json").read_text())["vocab_size"] == 2002


def test_peft_weights_on_another_base_are_refused(finished_runs, job_data, tmp_path, caplog):
    fold = finished_runs("lora") / "0"
    other = jf.make_tiny_checkpoint(tmp_path / "other", vocab_size=len(job_data.token_dictionary), seed=1)
    argv = ["predict", "--model_path", str(fold), "--input", str(job_data.fold_file(0, "test")), "--device", "cpu"]
    assert main(argv + ["--base_model", str(other), "--output", str(tmp_path / "a.csv")]) == 2
    message = _error(caplog)
    assert f"--base_model {other} is not the checkpoint {fold} was trained on" in message
    assert "--allow_other_base" in message and not (tmp_path / "a.csv").exists()
    assert main(argv + ["--base_model", str(other), "--output", str(tmp_path / "b.csv"), "--allow_other_base"]) == 0
    assert main(argv + ["--base_model", str(job_data.model_path), "--output", str(tmp_path / "c.csv")]) == 0


# ----------------------------------------------------------------------------- labels and truncation


@pytest.mark.parametrize("change, expected", [
    (lambda cols: cols.update(cell_type=["T cell"] * len(cols["cell_type"])), "a single class"),
    (lambda cols: cols["cell_type"].__setitem__(2, "nan"), "missing labels"),
])
def test_single_class_and_nan_labels_are_named_up_front(change, expected, job_data, tmp_path, caplog):
    data = jf.copy_job_data(job_data, tmp_path)
    jf.rewrite_split(data, 1, "train", change)
    assert jf.run_finetune(data.finetune_argv(tmp_path / "out", "--prompt_type", "lora")) == 2
    message = _error(caplog)
    assert expected in message and "fold 1" in message and "train split" in message
    assert not (jf.run_dir(tmp_path / "out", "lora", data) / "0").exists()  # fold 0 did not train first


def test_truncation_numbers_match_a_direct_count():
    import datasets

    from geneformer_peft.checks.data import check_truncation
    from geneformer_peft.checks.report import CompatibilityReport

    lengths = [10, 30, 50, 12]
    ds = datasets.Dataset.from_dict({"input_ids": [list(range(2, 2 + n)) for n in lengths]})
    report = CompatibilityReport("m", "d")
    check_truncation(report, {"cells": ds}, 20)
    finding = report["truncation"]
    assert finding.status == "warning" and finding.details["n_cells_cut"] == 2
    assert finding.details["genes_dropped_median"] == 20 and finding.details["genes_dropped_max"] == 30
    share = [sum(r ** -0.5 for r in range(21, n + 1)) / sum(r ** -0.5 for r in range(1, n + 1)) for n in (30, 50)]
    assert finding.details["rank_weight_dropped_max"] == pytest.approx(max(share))
    assert finding.details["rank_weight_dropped_median"] == pytest.approx(np.median(share))
    assert "2 of 4 cells (50%) are longer than the model's 20 input tokens" in finding.message
    report = CompatibilityReport("m", "d")
    check_truncation(report, {"cells": ds}, 50)
    assert report["truncation"].status == "ok"


def test_perturb_says_a_gene_is_expressed_beyond_the_input(tmp_path, caplog):
    import datasets

    from analysis_factories import gene_id, hf_checkpoint, save_cells
    from geneformer_peft.analysis.runs import run_perturb

    hf_checkpoint(tmp_path / "ckpt")
    rng = np.random.default_rng(0)
    rows = []
    for i in range(6):  # 70 genes per cell, the model reads 64; gene token 90 at rank 68 in cells 0-3
        others = [t for t in rng.permutation(range(4, 99)).tolist() if t != 90][:70]
        if i < 4:
            others[67] = 90
        rows.append(others)
    save_cells(datasets.Dataset.from_dict({"input_ids": rows, "length": [70] * 6}), tmp_path / "cells.dataset")
    with caplog.at_level(logging.WARNING):
        out = run_perturb(tmp_path / "ckpt", tmp_path / "cells.dataset", tmp_path / "scan", genes=[gene_id(86)],
                          device="cpu", plots=False, n_null=0)
    assert out["summary"]["n_cells_beyond_input"] == {gene_id(86): 4}
    assert out["summary"]["n_cells_absent"] == {gene_id(86): 6}
    messages = [r.getMessage() for r in caplog.records]
    assert any(f"{gene_id(86)} is expressed in 4 of 6 cells, beyond the first 64 genes the model reads in all of "
               "them" in m for m in messages)
    assert not any("expressed by none" in m for m in messages)
    assert any("truncation" in m and "6 of 6 cells" in m for m in messages)


# ----------------------------------------------------------------------------- real data


@pytest.mark.skipif(not (SHARED / "cellbench_celseq2_5cl.h5ad").is_file(), reason="shared/data absent")
def test_real_cells_on_a_checkpoint_remapped_to_geneformer_v1_are_refused(tmp_path, caplog):
    """The issue's first case: the example checkpoint put on Geneformer's V1 dictionary shares no
    gene with it; CellBench's Ensembl-named cells tokenize fine but land on rows never pretrained."""
    remapped = tmp_path / "v1"
    argv = ["remap-vocab", "--model_path", str(EXAMPLE_CKPT), "--token_dictionary",
            str(SHARED / "geneformer_v1_token_dictionary.pkl"), "--output_dir", str(remapped)]
    assert main(argv) == 2
    assert "0 of the new vocabulary's 25424 genes keep pretrained rows" in _error(caplog)
    assert main(argv + ["--allow_low_gene_overlap"]) == 0
    caplog.clear()
    out = tmp_path / "report.json"
    assert main(["check", "--model_path", str(remapped), "--input", str(SHARED / "cellbench_celseq2_5cl.h5ad"),
                 "--gene_median_dictionary", str(SHARED / "geneformer_v1_gene_median_dictionary.pkl"),
                 "--label_column", "cell_type", "--output", str(out)]) == 2
    assert "none of the data's" in _error(caplog)
    found = {f["check"]: f for f in json.loads(out.read_text())["reports"]["input"]["findings"]}
    assert found["vocabulary"]["details"]["tokenized"]["count_share_matched"] > 0.5  # the ids are Ensembl: they match
    assert found["vocabulary"]["details"]["n_pretrained"] == 0
    assert found["truncation"]["status"] == "warning"  # CellBench cells hold far more than 256 genes


def test_symbols_against_an_ensembl_vocabulary_are_refused_with_the_map_hint(tmp_path, caplog):
    from geneformer_peft.data.synthetic import generate_counts
    from geneformer_peft.data.vocab import build_vocabulary, save_tokenizer_json, write_dictionaries

    adata = generate_counts(n_cells=30, n_genes=120, n_cell_types=2, seed=5)
    adata.var = adata.var.drop(columns=["ensembl_id"])
    adata.var_names = [f"ENSG{i:011d}" for i in range(adata.n_vars)]
    tokens, medians = build_vocabulary(adata, show_progress=False)
    ckpt = jf.make_tiny_checkpoint(tmp_path / "ckpt", vocab_size=len(tokens), max_position_embeddings=64)
    write_dictionaries(ckpt, tokens, medians)
    save_tokenizer_json(tokens, ckpt)
    symbols = adata.copy()
    symbols.var_names = [f"GENE{i}" for i in range(adata.n_vars)]
    symbols.write_h5ad(tmp_path / "symbols.h5ad")
    (tmp_path / "map.csv").write_text("symbol,ensembl_id\n" + "".join(
        f"GENE{i},ENSG{i:011d}\n" for i in range(adata.n_vars)))
    out = tmp_path / "r.json"
    argv = ["check", "--model_path", str(ckpt), "--input", str(tmp_path / "symbols.h5ad"), "--output", str(out)]
    assert main(argv) == 2
    assert "gene_ids" in _error(caplog) and "--gene_name_id_dictionary" in _error(caplog)
    finding = json.loads(out.read_text())["reports"]["input"]["findings"][0]
    assert finding["check"] == "gene_ids" and finding["status"] == "refused"
    assert finding["details"]["symbol_fraction"] == 1.0
    assert main(argv + ["--gene_name_id_dictionary", str(tmp_path / "map.csv"), "--overwrite"]) == 0
    found = {f["check"]: f for f in json.loads(out.read_text())["reports"]["input"]["findings"]}
    assert found["gene_ids"]["status"] == "ok" and found["vocabulary"]["status"] == "ok"
    assert found["vocabulary"]["details"]["tokenized"]["count_share_matched"] == 1.0


def test_cellfm_checkpoint_shapes_are_checked(tmp_path, caplog):
    from geneformer_peft.checks.checkpoint import check_checkpoint_shapes
    from geneformer_peft.checks.report import CompatibilityReport
    from transformerslocal.configuration_cellfm import CellFMConfig
    from transformerslocal.modeling_cellfm import CellFMModel

    config = CellFMConfig(vocab_size=40, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                          intermediate_size=24)
    CellFMModel(config).save_pretrained(tmp_path / "ckpt")
    report = CompatibilityReport("m", "d")
    check_checkpoint_shapes(report, tmp_path / "ckpt", config)
    assert report["checkpoint"].status == "ok" and report["checkpoint"].details["layers"] == 2
    report = CompatibilityReport("m", "d")
    check_checkpoint_shapes(report, tmp_path / "ckpt", config.copy(num_hidden_layers=3, vocab_size=48))
    assert report["checkpoint"].status == "refused"
    assert report["checkpoint"].details["mismatches"] == [
        "vocab_size=48 but gene_emb has 40 (shape [40, 16])", "num_hidden_layers=3 but the weights hold 2 layers"]


def test_ensembl_ids_against_a_cellfm_vocabulary_of_symbols_are_refused_then_mapped(tmp_path, caplog):
    """CellFM's release names its genes by symbol; a file of Ensembl ids is refused by `check` with the
    map hint, and passes with --gene_name_id_dictionary (read backwards)."""
    import transformerslocal as tl
    from geneformer_peft.data.synthetic import generate_counts
    from geneformer_peft.data.vocab import save_tokenizer_json

    adata = generate_counts(n_cells=30, n_genes=120, n_cell_types=2, seed=5)
    adata.var = adata.var.drop(columns=["ensembl_id"])
    adata.var_names = [f"ENSG{i:011d}" for i in range(adata.n_vars)]
    adata.write_h5ad(tmp_path / "ensembl.h5ad")
    tokens = {"<pad>": 0, **{f"GENE{i}": i + 1 for i in range(adata.n_vars)}}
    config = tl.CellFMConfig(vocab_size=len(tokens), hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                             intermediate_size=24, max_genes=64)
    tl.CellFMForMaskedValues(config).save_pretrained(tmp_path / "ckpt")
    save_tokenizer_json(tokens, tmp_path / "ckpt")
    (tmp_path / "map.csv").write_text("symbol,ensembl_id\n" + "".join(
        f"GENE{i},ENSG{i:011d}\n" for i in range(adata.n_vars)))
    out = tmp_path / "r.json"
    argv = ["check", "--model_path", str(tmp_path / "ckpt"), "--input", str(tmp_path / "ensembl.h5ad"),
            "--output", str(out)]
    assert main(argv) == 2
    assert "are Ensembl ids" in _error(caplog) and "--gene_name_id_dictionary" in _error(caplog)
    assert json.loads(out.read_text())["reports"]["input"]["findings"][0]["status"] == "refused"
    assert main(argv + ["--gene_name_id_dictionary", str(tmp_path / "map.csv"), "--overwrite"]) == 0
    found = {f["check"]: f for f in json.loads(out.read_text())["reports"]["input"]["findings"]}
    assert found["gene_ids"]["status"] == "ok" and found["encoding"]["status"] == "ok"
