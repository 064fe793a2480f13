"""The ``geneformer-peft`` command line: tokenize and split end to end."""

from __future__ import annotations

import pickle

import datasets
import pytest

from data_factories import make_adata, make_vocab
from geneformer_peft.cli import COMMANDS, build_parser, main
from geneformer_peft.data.folds import load_fold


@pytest.fixture
def inputs(tmp_path):
    adata = make_adata(40, 30, seed=5)
    adata.obs["demuxlet_cls"] = ["DBL" if i % 10 == 0 else "SNG" for i in range(40)]
    adata.write_h5ad(tmp_path / "cells.h5ad")
    tokens, medians = make_vocab(list(adata.var_names), seed=5)
    (tmp_path / "tokens.pkl").write_bytes(pickle.dumps(tokens))
    (tmp_path / "medians.pkl").write_bytes(pickle.dumps(medians))
    return tmp_path


def test_tokenize_and_split_end_to_end(inputs):
    out = inputs / "cells.dataset"
    argv = ["--log_level", "WARNING", "tokenize", "--input", str(inputs / "cells.h5ad"), "--output", str(out),
            "--token_dictionary", str(inputs / "tokens.pkl"), "--gene_median_dictionary", str(inputs / "medians.pkl"),
            "--label_column", "cell_type", "--keep_columns", "batch", "--model_input_size", "16",
            "--chunk_size", "7", "--obs_filter", "demuxlet_cls=SNG", "--no_progress"]
    assert main(argv) == 0
    dataset = datasets.load_from_disk(str(out))
    assert dataset.num_rows == 36
    assert dataset.column_names == ["input_ids", "length", "cell_type", "batch"]
    assert max(dataset["length"]) <= 16

    assert main(argv) == 2  # refuses to overwrite
    assert main(argv + ["--overwrite"]) == 0

    split = ["split", "--input", str(out), "--dataset_name", "toy", "--output_dir", str(inputs / "data"),
             "--n_folds", "3", "--label_column", "cell_type", "--seed", "0"]
    assert main(split) == 0
    train, val, test = load_fold(inputs / "data", "toy", 2)
    assert train.num_rows + val.num_rows + test.num_rows == 36
    assert main(split) == 2
    assert main(split + ["--overwrite"]) == 0


def test_tokenize_with_built_vocabulary(inputs):
    out = inputs / "v2.dataset"
    argv = ["tokenize", "--input", str(inputs / "cells.h5ad"), "--output", str(out), "--build_vocab",
            str(inputs / "vocab"), "--model_version", "V2", "--model_input_size", "10", "--no_progress"]
    assert main(argv) == 0
    dataset = datasets.load_from_disk(str(out))
    tokens = pickle.loads((inputs / "vocab" / "token_dictionary.pkl").read_bytes())
    assert all(ids[0] == tokens["<cls>"] and ids[-1] == tokens["<eos>"] for ids in dataset["input_ids"])
    assert (inputs / "vocab" / "tokenizer.json").exists()


def test_bad_input_returns_error_status(inputs, caplog):
    argv = ["tokenize", "--input", str(inputs / "cells.h5ad"), "--output", str(inputs / "x.dataset"),
            "--token_dictionary", str(inputs / "tokens.pkl")]
    assert main(argv) == 2
    assert "needs --token_dictionary and --gene_median_dictionary" in caplog.text
    assert main(["split", "--input", str(inputs), "--dataset_name", "t", "--output_dir", str(inputs / "d")]) == 2
    assert "not a dataset saved with save_to_disk" in caplog.text


def test_help_documents_every_flag(capsys):
    parser = build_parser()
    assert set(COMMANDS) >= {"tokenize", "split"}
    for name in ("tokenize", "split"):
        with pytest.raises(SystemExit):
            parser.parse_args([name, "--help"])
        text = capsys.readouterr().out
        sub = parser._subparsers._group_actions[0].choices[name]
        for action in sub._actions:
            assert action.help, f"{name} {action.option_strings} has no help"
            assert action.option_strings[0] in text
