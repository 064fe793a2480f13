"""The Python API (``import geneformer_peft as gp``) against the commands it mirrors: on the
same tiny data each function gives what its command writes."""
from __future__ import annotations

import inspect
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import job_factories as jf

import geneformer_peft as gp
from geneformer_peft.cli import main
from geneformer_peft.errors import DataError
from api_factories import make_adata as _adata


@pytest.fixture(scope="module")
def lora_fold(finished_runs):
    return finished_runs("lora") / "0"


def test_the_api_is_the_package_face_and_loads_lazily():
    code = ("import sys, geneformer_peft as gp; assert 'torch' not in sys.modules; "
            "print(sorted(n for n in dir(gp)))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=jf._subprocess_env(),
                         cwd=jf.ROOT)
    assert out.returncode == 0, out.stderr
    for name in ("tokenize", "split", "finetune", "predict", "embed", "perturb", "check"):
        assert name in out.stdout
        assert inspect.getdoc(getattr(gp, name)).count("Parameters") == 1  # numpydoc
        params = inspect.signature(getattr(gp, name)).parameters.values()
        assert all(p.kind in (p.KEYWORD_ONLY, p.VAR_KEYWORD) for p in list(params)[2 if name == "check" else 1:])


def test_tokenize_an_anndata_as_the_command_tokenizes_its_file(tmp_path, vocab):
    adata = _adata()
    adata.write_h5ad(tmp_path / "cells.h5ad")
    assert main(["tokenize", "--input", str(tmp_path / "cells.h5ad"), "--output", str(tmp_path / "cli.dataset"),
                 "--token_dictionary", str(vocab[0]), "--gene_median_dictionary", str(vocab[1]),
                 "--label_column", "cell_type", "--model_input_size", "64", "--no_progress"]) == 0
    mine = gp.tokenize(adata, token_dictionary=vocab[0], gene_median_dictionary=vocab[1], label_column="cell_type",
                       model_input_size=64, output=tmp_path / "api.dataset", progress=False)
    from geneformer_peft.data.dataset_io import load_saved_dataset

    theirs = load_saved_dataset(tmp_path / "cli.dataset")
    assert mine["input_ids"] == theirs["input_ids"] and mine["cell_type"] == theirs["cell_type"]
    assert load_saved_dataset(tmp_path / "api.dataset")["input_ids"] == theirs["input_ids"]
    with pytest.raises(DataError, match="exists already"):  # as the command: no finished output overwritten
        gp.tokenize(adata, token_dictionary=vocab[0], gene_median_dictionary=vocab[1], output=tmp_path / "api.dataset")
    with pytest.raises(DataError, match="needs --token_dictionary and --gene_median_dictionary"):
        gp.tokenize(adata, token_dictionary=vocab[0])


def test_tokenize_maps_symbols_as_the_command_does(tmp_path):
    """gp.tokenize(gene_name_id_dictionary=) gives the cells that the Ensembl-named counts give."""
    from geneformer_peft.data.vocab import build_vocabulary

    adata = _adata()
    if "ensembl_id" in adata.var:
        adata.var = adata.var.drop(columns=["ensembl_id"])
    adata.var_names = [f"ENSG{i:011d}" for i in range(adata.n_vars)]
    tokens, medians = build_vocabulary(adata, show_progress=False)
    symbols = adata.copy()
    symbols.var_names = [f"SYM{i}" for i in range(symbols.n_vars)]
    mapping = dict(zip(symbols.var_names, adata.var_names))
    expected = gp.tokenize(adata, token_dictionary=tokens, gene_median_dictionary=medians, model_input_size=64,
                           progress=False)
    mapped = gp.tokenize(symbols, token_dictionary=tokens, gene_median_dictionary=medians, model_input_size=64,
                         progress=False, gene_name_id_dictionary=mapping)
    assert mapped["input_ids"] == expected["input_ids"]
    with pytest.raises(DataError, match="--build_vocab builds the vocabulary from the file's own gene ids"):
        gp.tokenize(symbols, build_vocab=tmp_path / "v", gene_name_id_dictionary=mapping, progress=False)


def test_split_writes_the_folds_the_command_writes(tmp_path, job_data):
    assert main(["split", "--input", str(job_data.cells), "--dataset_name", "tiny", "--output_dir",
                 str(tmp_path / "cli"), "--n_folds", "3"]) == 0
    folder = gp.split(job_data.cells, dataset_name="tiny", output_dir=tmp_path / "api", n_folds=3)
    assert folder == tmp_path / "api" / "tiny"
    from geneformer_peft.data.folds import load_fold

    for fold in range(3):
        for mine, theirs in zip(load_fold(tmp_path / "api", "tiny", fold), load_fold(tmp_path / "cli", "tiny", fold)):
            assert mine["input_ids"] == theirs["input_ids"]


def test_finetune_defaults_are_the_commands():
    from geneformer_peft.api.training import finetune_defaults

    defaults = finetune_defaults()
    for name, param in inspect.signature(gp.finetune).parameters.items():
        if name in defaults and param.default is not inspect.Parameter.empty:
            assert param.default == defaults[name], name
    with pytest.raises(TypeError, match=r"\['epoch'\].*warmup_ratio"):
        gp.finetune("x", model="y", epoch=3)
    with pytest.raises(DataError, match=r"sampler='balance'.*'balanced'"):
        gp.finetune("x", model="y", sampler="balance")


def test_finetune_gives_the_commands_outputs_and_a_result(tmp_path, job_data, finished_runs):
    cli_dir = finished_runs("lora")
    result = gp.finetune(job_data.data_path / job_data.dataset_name, model=job_data.model_path, method=["lora"],
                         output=tmp_path, epochs=2, batch_size=16, lr=3e-3, device="cpu", progress=False)
    assert result.run_dir == tmp_path / "lora" / job_data.dataset_name
    for fold in range(job_data.n_folds):
        mine = jf.result_metrics(result.fold(fold).metrics)
        theirs = jf.result_metrics(jf.read_json(cli_dir / str(fold) / "metrics.json"))
        assert mine == theirs
        pd.testing.assert_frame_equal(result.fold(fold).predictions, pd.read_csv(cli_dir / str(fold) / "predictions.csv"))
    assert list(result.summary.index) == [0, 1]
    assert result.summary.loc[1, "macro_f1"] == pytest.approx(result.fold(1).metrics["macro_f1"])
    assert list(result.baseline.index) == [0, 1] and "macro_f1" in result.baseline.columns
    assert result.comparison.loc["macro_f1", "baseline_mean"] == pytest.approx(result.baseline["macro_f1"].mean())
    assert result.sentence and "logistic regression" in result.sentence
    from matplotlib.figure import Figure

    for figure in (result.plot_summary(), result.plot_training_curves(1), result.plot_confusion_matrix()):
        assert isinstance(figure, Figure) and figure.axes
    assert result.fold(0).model.config.num_labels == 3
    again = gp.open_run(result.run_dir)
    pd.testing.assert_frame_equal(again.summary, result.summary)
    with pytest.raises(KeyError, match=r"fold 7 is not in this run; its folds are \[0, 1\]"):
        result.fold(7)


def test_predict_matches_the_command_and_writes_obs(tmp_path, job_data, lora_fold, vocab):
    assert main(["predict", "--model_path", str(lora_fold), "--input", str(job_data.cells), "--output",
                 str(tmp_path / "cli.csv")]) == 0
    theirs = pd.read_csv(tmp_path / "cli.csv")
    frame = gp.predict(job_data.cells, model=lora_fold, output=tmp_path / "api.csv")
    pd.testing.assert_frame_equal(frame.reset_index(drop=True), theirs, check_dtype=False)
    assert frame.attrs["metrics"]["macro_f1"] >= 0
    adata = _adata()
    from_adata = gp.predict(adata, model=lora_fold, token_dictionary=vocab[0], gene_median_dictionary=vocab[1])
    assert list(adata.obs["geneformer_pred"].astype(str)) == list(theirs["pred_celltype"])
    np.testing.assert_allclose(adata.obs["geneformer_pred_confidence"], theirs["confidence"], rtol=1e-5)
    assert list(from_adata.index) == list(adata.obs_names)


def test_embed_matches_the_command_and_writes_obsm(tmp_path, job_data, vocab):
    import anndata

    assert main(["embed", "--model_path", str(job_data.model_path), "--input", str(job_data.cells), "--output",
                 str(tmp_path / "cli.h5ad"), "--no_plots", "--token_dictionary", str(vocab[0])]) == 0
    theirs = anndata.read_h5ad(tmp_path / "cli.h5ad")
    mine = gp.embed(job_data.cells, model=job_data.model_path, token_dictionary=vocab[0])
    np.testing.assert_array_equal(mine.obsm["X_geneformer"], theirs.obsm["X_geneformer"])
    assert mine.uns["embedding_metrics"]["cell_type"]["knn_accuracy"] == pytest.approx(
        json.loads((tmp_path / "embedding_metrics.json").read_text())["labels"]["cell_type"]["knn_accuracy"])
    adata = _adata()
    out = gp.embed(adata, model=job_data.model_path, token_dictionary=vocab[0], gene_median_dictionary=vocab[1],
                   key_added="X_mine")
    assert out is adata
    np.testing.assert_allclose(adata.obsm["X_mine"], theirs.obsm["X_geneformer"], rtol=1e-5, atol=1e-6)


def test_perturb_gives_the_commands_statistics(tmp_path, job_data, vocab):
    common = ["--max_ncells", "6", "--n_null", "3", "--min_cells", "2", "--token_dictionary", str(vocab[0])]
    assert main(["perturb", "--model_path", str(job_data.model_path), "--input", str(job_data.cells), "--output_dir",
                 str(tmp_path / "cli"), "--perturb_type", "delete", "--genes", "all", "--no_plots", *common]) == 0
    stats = gp.perturb(job_data.cells, model=job_data.model_path, genes="all", max_ncells=6, n_null=3, min_cells=2,
                       token_dictionary=vocab[0])
    theirs = pd.read_csv(tmp_path / "cli" / "gene_stats.csv")
    pd.testing.assert_frame_equal(stats.reset_index(drop=True)[theirs.columns], theirs, check_dtype=False)
    assert stats.attrs["summary"]["n_cells"] == 6


def test_check_returns_the_commands_report(tmp_path, job_data):
    main(["check", "--model_path", str(job_data.model_path), "--input", str(job_data.data_path / "tiny"),
          "--output", str(tmp_path / "report.json")])
    reports = gp.check(job_data.model_path, job_data.data_path / "tiny")

    def steady(all_reports):  # the memory finding reads the machine's free memory, which moves between calls
        return {name: {**r, "findings": [f for f in r["findings"] if f["check"] != "memory"]}
                for name, r in all_reports.items()}

    assert steady(reports) == steady(json.loads((tmp_path / "report.json").read_text())["reports"])
    assert set(reports) == {"fold 0", "fold 1"}
    from geneformer_peft.data.dataset_io import load_saved_dataset

    in_memory = gp.check(job_data.model_path, load_saved_dataset(job_data.cells))
    assert set(in_memory) == {"input"} and in_memory["input"]["compatible"] is True


def test_a_notebook_sees_a_concise_log_and_no_datasets_bars(tmp_path, job_data):
    code = (f"import geneformer_peft as gp; gp.split({str(job_data.cells)!r}, dataset_name='t', "
            f"output_dir={str(tmp_path)!r}, n_folds=2)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=jf._subprocess_env(),
                         cwd=jf.ROOT)
    assert out.returncode == 0, out.stderr
    assert "Saving the dataset" not in out.stderr and "%|" not in out.stderr
    assert f"wrote 2 folds under {tmp_path / 't'}" in out.stderr
    from geneformer_peft.api._session import ConciseFilter
    import logging

    record = logging.LogRecord("geneformer_peft.x", logging.INFO, "", 0, "run settings: %s", ("{...}",), None)
    assert not ConciseFilter().filter(record)


def test_a_missing_extra_is_named(monkeypatch):
    import anndata

    import geneformer_peft.analysis.figures as figures

    adata = anndata.AnnData(obs=pd.DataFrame({"cell_type": ["a", "b", "a"]}, index=["x", "y", "z"]))
    adata.obsm["X_geneformer"] = np.zeros((3, 4))
    monkeypatch.setattr(figures, "umap_coordinates", lambda *a, **k: None)  # as without umap-learn
    with pytest.raises(ImportError, match=r"pip install 'geneformer-peft\[umap\]'"):
        gp.umap(adata)
    with pytest.raises(DataError, match="adata.obsm has no 'X_other'"):
        gp.umap(adata, key="X_other")


def test_finetune_parses_text_options_as_the_command(monkeypatch, job_data, tmp_path):
    """A path or number given as text reaches the job as the command would pass it."""
    import geneformer_peft.training.cross_validation as cv

    seen = {}
    monkeypatch.setattr(cv, "run_cross_validation", lambda opts: seen.setdefault("opts", opts) and
                        {"run_dir": str(tmp_path), "fold_ids": [], "folds": [], "metrics": {}})
    gp.finetune(job_data.data_path / "tiny", model=job_data.model_path, token_dictionary="vocab.json",
                weight_decay="0.01", use_prompt="false", output=tmp_path)
    opts = seen["opts"]
    assert opts.token_dictionary == Path("vocab.json") and opts.training.weight_decay == 0.01
    assert opts.use_prompt is False
    with pytest.raises(DataError, match="finetune weight_decay='heavy'"):
        gp.finetune(job_data.data_path / "tiny", model=job_data.model_path, weight_decay="heavy")


def test_split_on_the_command_line_saves_without_datasets_bars(tmp_path, job_data):
    out = subprocess.run([sys.executable, "-m", "geneformer_peft.cli", "split", "--input", str(job_data.cells),
                          "--dataset_name", "t", "--output_dir", str(tmp_path), "--n_folds", "2"],
                         capture_output=True, text=True, env=jf._subprocess_env(), cwd=jf.ROOT)
    assert out.returncode == 0, out.stderr
    assert "Saving the dataset" not in out.stderr and "wrote 2 folds" in out.stderr
