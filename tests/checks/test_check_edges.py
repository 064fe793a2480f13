"""Valid inputs the report must accept, and the remaining ways a result could be silently wrong
or lost (found in review)."""
from __future__ import annotations

import json
import logging
import pickle
import shutil
from pathlib import Path

import datasets
import pytest

from geneformer_peft.cli import main

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE_CKPT = ROOT / "Pretrain_ckpts" / "geneformer-tiny-example"
EXAMPLE_DATA = ROOT / "example_py" / "data"
EXAMPLE_TEST0 = EXAMPLE_DATA / "synthetic" / "0" / "synthetic_test0.dataset"


def _error(caplog) -> str:
    return "\n".join(r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR)


def test_a_checkpoint_padded_beyond_eight_rows_is_accepted(tmp_path):
    out = tmp_path / "padded"
    assert main(["remap-vocab", "--model_path", str(EXAMPLE_CKPT), "--token_dictionary",
                 str(EXAMPLE_CKPT / "tokenizer.json"), "--output_dir", str(out), "--pad_to_multiple_of", "64"]) == 0
    assert json.loads((out / "config.json").read_text())["vocab_size"] == 2048
    assert main(["check", "--model_path", str(out), "--input", str(EXAMPLE_TEST0)]) == 0


def test_a_fold_layout_without_split_info_is_checked(tmp_path):
    shutil.copytree(EXAMPLE_DATA / "synthetic", tmp_path / "synthetic", ignore=shutil.ignore_patterns("split_info.json"))
    out = tmp_path / "r.json"
    assert main(["check", "--model_path", str(EXAMPLE_CKPT), "--input", str(tmp_path / "synthetic"), "--output",
                 str(out)]) == 0
    assert json.loads(out.read_text())["kind"] == "folds"


def test_cells_of_one_class_are_fine_to_predict(tmp_path):
    cells = datasets.load_from_disk(str(EXAMPLE_TEST0))
    one = cells.filter(lambda row: row["cell_type"] == "T cell", keep_in_memory=True)  # no cache file in the example
    one.save_to_disk(str(tmp_path / "t.dataset"))
    assert main(["check", "--model_path", str(EXAMPLE_CKPT), "--input", str(tmp_path / "t.dataset"),
                 "--label_column", "cell_type"]) == 0


def test_labels_named_na_are_labels(tmp_path):
    cells = datasets.load_from_disk(str(EXAMPLE_TEST0)).to_dict()
    cells["cell_type"] = ["NA" if i % 2 else "None" for i in range(len(cells["cell_type"]))]
    datasets.Dataset.from_dict(cells).save_to_disk(str(tmp_path / "na.dataset"))
    assert main(["check", "--model_path", str(EXAMPLE_CKPT), "--input", str(tmp_path / "na.dataset"),
                 "--label_column", "cell_type"]) == 0


def test_a_checkpoint_with_two_different_dictionaries_is_refused(tmp_path, caplog):
    ckpt = tmp_path / "ckpt"
    shutil.copytree(EXAMPLE_CKPT, ckpt)
    with open(ckpt / "token_dictionary.pkl", "rb") as handle:
        tokens = pickle.load(handle)
    tokens.pop(next(k for k in tokens if not k.startswith("<")))
    (ckpt / "token_dictionary.pkl").write_bytes(pickle.dumps(tokens))
    assert main(["check", "--model_path", str(ckpt), "--input", str(EXAMPLE_TEST0)]) == 2
    assert "holds two different token dictionaries, tokenizer.json and token_dictionary.pkl" in _error(caplog)


def test_data_tokenized_with_another_dictionary_of_the_same_size_is_refused(tmp_path, caplog):
    from geneformer_peft.data.rank_value import tokenize_anndata
    from geneformer_peft.data.synthetic import generate_counts
    from geneformer_peft.data.vocab import load_gene_median_dictionary, load_token_dictionary

    tokens = load_token_dictionary(EXAMPLE_CKPT / "tokenizer.json")
    genes = [k for k in tokens if not k.startswith("<")]
    shuffled = {"<pad>": 0, "<mask>": 1, **{g: 2 + i for i, g in enumerate(reversed(genes))}}
    adata = generate_counts(n_cells=30, n_genes=2000, n_cell_types=3, seed=4)
    medians = load_gene_median_dictionary(EXAMPLE_CKPT / "gene_median_dictionary.pkl")
    for name, dictionary in (("own", tokens), ("other", shuffled)):
        tokenize_anndata(adata, token_dictionary=dictionary, gene_median_dictionary=medians, model_input_size=256,
                         label_column="cell_type", show_progress=False).save_to_disk(str(tmp_path / f"{name}.dataset"))
    assert main(["check", "--model_path", str(EXAMPLE_CKPT), "--input", str(tmp_path / "own.dataset")]) == 0
    assert main(["check", "--model_path", str(EXAMPLE_CKPT), "--input", str(tmp_path / "other.dataset")]) == 2
    assert "was tokenized with another token dictionary" in _error(caplog)


def test_the_refusal_of_another_base_names_the_one_trained_on(finished_runs, job_data, tmp_path, caplog):
    import job_factories as jf

    fold = finished_runs("lora") / "0"
    other = jf.make_tiny_checkpoint(tmp_path / "other", vocab_size=len(job_data.token_dictionary), seed=2)
    assert main(["check", "--model_path", str(fold), "--base_model", str(other), "--input",
                 str(job_data.fold_file(0, "test"))]) == 2
    assert f"pass the base the fold was trained on ({Path(job_data.model_path).resolve()})" in _error(caplog)


def test_a_second_embed_into_the_folder_keeps_the_first_report(tmp_path):
    argv = ["embed", "--model_path", str(EXAMPLE_CKPT), "--input", str(EXAMPLE_TEST0), "--device", "cpu",
            "--no_plots"]
    assert main(argv + ["--output", str(tmp_path / "a.csv")]) == 0
    first = (tmp_path / "embedding_metrics.json").read_text()
    assert main(argv + ["--output", str(tmp_path / "b.csv")]) == 0
    assert (tmp_path / "a.csv.embedding_metrics.json").read_text() == first  # kept, named after its output
    assert json.loads((tmp_path / "embedding_metrics.json").read_text())["output"] == str(tmp_path / "b.csv")


def test_a_perturbation_scan_is_not_resumed_on_other_cells(tmp_path, caplog):
    cells = datasets.load_from_disk(str(EXAMPLE_TEST0))
    cells.select(range(10)).save_to_disk(str(tmp_path / "in.dataset"))
    argv = ["perturb", "--model_path", str(EXAMPLE_CKPT), "--input", str(tmp_path / "in.dataset"), "--output_dir",
            str(tmp_path / "scan"), "--genes", "all", "--perturb_type", "delete", "--device", "cpu", "--no_plots",
            "--max_ncells", "4"]
    assert main(argv) == 0
    shutil.rmtree(tmp_path / "in.dataset")
    cells.select(range(10, 20)).save_to_disk(str(tmp_path / "in.dataset"))
    assert main(argv) == 2
    assert "other settings" in _error(caplog) and "input" in _error(caplog)


def test_check_keeps_an_existing_report(tmp_path, caplog):
    out = tmp_path / "r.json"
    argv = ["check", "--model_path", str(EXAMPLE_CKPT), "--input", str(EXAMPLE_TEST0), "--output", str(out)]
    assert main(argv) == 0
    before = out.read_text()
    assert main(argv) == 2 and out.read_text() == before
    assert main(argv + ["--overwrite"]) == 0


def test_an_interrupted_perturb_overwrite_leaves_the_old_scan_whole(tmp_path, monkeypatch):
    import geneformer_peft.analysis.runs as runs

    argv = ["perturb", "--model_path", str(EXAMPLE_CKPT), "--input", str(EXAMPLE_TEST0), "--output_dir",
            str(tmp_path / "scan"), "--genes", "all", "--perturb_type", "delete", "--device", "cpu", "--no_plots",
            "--max_ncells", "3"]
    assert main(argv) == 0
    before = {p.relative_to(tmp_path): p.read_bytes() for p in (tmp_path / "scan").rglob("*") if p.is_file()}

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(runs, "perturbation_statistics", interrupted)
    assert main(argv[:-1] + ["4", "--overwrite"]) == 130
    after = {p.relative_to(tmp_path): p.read_bytes() for p in (tmp_path / "scan").rglob("*") if p.is_file()}
    assert after == before
    monkeypatch.undo()
    assert main(argv[:-1] + ["4", "--overwrite"]) == 0
    assert json.loads((tmp_path / "scan" / "summary.json").read_text())["n_cells"] == 4
