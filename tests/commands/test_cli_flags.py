"""Every flag value error names its flag, at parse time, for every command: numeric flags go
through the shared argument types of :mod:`geneformer_peft.commands._common`, so ``--seed -1``
or ``--folds 0,0`` fails before any data is read (argparse: exit 2, ``argument --seed: ...``)."""
from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from geneformer_peft import cli
from geneformer_peft.commands import _common


def _subparsers() -> dict[str, argparse.ArgumentParser]:
    parser = cli.build_parser()
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


def _minimal_argv(command: str) -> list[str]:
    """``command`` with a placeholder for each required option (parsing only, nothing runs)."""
    sub = _subparsers()[command]
    argv = [command]
    chosen = set()
    for group in sub._mutually_exclusive_groups:
        if group.required:
            chosen.add(group._group_actions[0].dest)
    for action in sub._actions:
        if action.option_strings and (action.required or action.dest in chosen):
            argv += [action.option_strings[0], action.choices[0] if action.choices else "x"]
    return argv


def _refused(argv: list[str], capsys) -> str:
    with pytest.raises(SystemExit) as stop:
        cli.build_parser().parse_args(argv)
    assert stop.value.code == 2
    return capsys.readouterr().err.strip().splitlines()[-1]


SEEDED = ["split", "pretrain", "finetune", "remap-vocab", "embed", "perturb", "search", "classify-genes"]


@pytest.mark.parametrize("command", SEEDED)
def test_negative_seed_is_refused_naming_the_flag(command, capsys):
    last = _refused([*_minimal_argv(command), "--seed", "-1"], capsys)
    assert "argument --seed: expected an integer >= 0" in last and "got -1" in last


@pytest.mark.parametrize("command", ["finetune", "classify-genes", "search"])
@pytest.mark.parametrize("folds, expected", [("0,0", "fold 0 given more than once"), ("1,0,1", "fold 1 given"),
                                             ("-1", "expected fold numbers >= 0"), ("0,x", "comma-separated"),
                                             (",", "comma-separated")])
def test_bad_fold_lists_are_refused_at_parse_time(command, folds, expected, capsys):
    last = _refused([*_minimal_argv(command), "--folds", folds], capsys)
    assert "argument --folds: " in last and expected in last


@pytest.mark.parametrize("command, flag, value, expected", [
    ("finetune", "--epoch", "0", "an integer >= 1"),
    ("finetune", "--batch_size", "0", "an integer >= 1"),
    ("finetune", "--lr", "-0.001", "a number > 0"),
    ("finetune", "--lr", "nan", "a number > 0"),
    ("finetune", "--warmup_ratio", "1", "a number in [0, 1)"),
    ("finetune", "--layer_decay", "0", "a number in (0, 1]"),
    ("finetune", "--weight_decay", "-0.1", "a number >= 0"),
    ("finetune", "--early_stopping_patience", "-1", "an integer >= 0"),
    ("finetune", "--num_threads", "0", "an integer >= 1"),
    ("finetune", "--max_length", "0", "an integer >= 1"),
    ("split", "--n_folds", "1", "an integer >= 2"),
    ("split", "--val_fraction", "1", "a number in [0, 1)"),
    ("tokenize", "--chunk_size", "0", "an integer >= 1"),
    ("tokenize", "--model_input_size", "-5", "an integer >= 1"),
    ("tokenize", "--bin_num", "300", "an integer in [1, 254]"),
    ("tokenize", "--min_genes", "-1", "an integer >= 0"),
    ("pretrain", "--max_steps", "0", "an integer >= 1"),
    ("pretrain", "--lr", "0", "a number > 0"),
    ("predict", "--unassign_threshold", "1.5", "a number in [0, 1]"),
    ("predict", "--batch_size", "-2", "an integer >= 1"),
    ("remap-vocab", "--pad_to_multiple_of", "-8", "an integer >= 0"),
    ("embed", "--max_ncells", "0", "an integer >= 1"),
    ("perturb", "--rank_shift", "0", "a number in (0, 1]"),
    ("perturb", "--n_null", "-1", "an integer >= 0"),
    ("perturb", "--chunk_cells", "0", "an integer >= 1"),
    ("search", "--n_trials", "-1", "an integer >= 0"),
    ("search", "--timeout", "0", "a number > 0"),
    ("classify-genes", "--n_folds", "1", "an integer >= 2"),
    ("classify-genes", "--max_cells", "0", "an integer >= 1"),
    ("finetune", "--seed", "abc", "an integer >= 0"),
])
def test_out_of_range_values_are_refused_naming_the_flag(command, flag, value, expected, capsys):
    last = _refused([*_minimal_argv(command), flag, value], capsys)
    assert f"argument {flag}" in last and expected in last and value in last, last


@pytest.mark.parametrize("command", sorted(cli.COMMANDS))
def test_every_numeric_flag_uses_a_checked_type(command):
    """A bare int/float type accepts -1 or 0 and leaves the error to some later stage, which may
    not name the flag; --emb_layer counts down from the last layer, so any integer parses."""
    unchecked = [action.option_strings[0] for action in _subparsers()[command]._actions
                 if action.type in (int, float) and action.dest != "emb_layer"]
    assert not unchecked, f"{command}: give {unchecked} a type from geneformer_peft.commands._common"


def test_valid_values_parse(capsys):
    args = cli.build_parser().parse_args([*_minimal_argv("finetune"), "--folds", "1,0", "--seed", "4294967295",
                                          "--lr", "5e-5", "--warmup_ratio", "0", "--layer_decay", "1",
                                          "--use_prompt", "false"])
    assert args.folds == [1, 0] and args.seed == 2**32 - 1 and args.lr == 5e-5 and args.use_prompt is False
    assert _common.fold_list(" 2, 3 ") == [2, 3]


def test_the_example_script_checks_its_flags_too(example_script, capsys):
    with pytest.raises(SystemExit) as stop:
        example_script.main(["--seed", "-1"])
    assert stop.value.code == 2
    assert "argument --seed: expected an integer >= 0" in capsys.readouterr().err


# ----------------------------------------------------------------------------- file or folder

FOLDER_FLAGS = [("finetune", "--data_path"), ("finetune", "--model_path"), ("finetune", "--output_path"),
                ("split", "--input"), ("split", "--output_dir"), ("tokenize", "--output"), ("tokenize", "--build_vocab"),
                ("pretrain", "--input"), ("pretrain", "--model_path"), ("predict", "--model_path"),
                ("predict", "--input"), ("embed", "--model_path"), ("embed", "--base_model"), ("perturb", "--input"),
                ("perturb", "--output_dir"), ("remap-vocab", "--model_path"), ("convert-scbert", "--output_dir"),
                ("search", "--data_path"), ("search", "--output_dir"), ("classify-genes", "--input")]
FILE_FLAGS = [("tokenize", "--input"), ("tokenize", "--gene_median_dictionary"), ("tokenize", "--gene_panel"),
              ("predict", "--output"), ("embed", "--output"), ("embed", "--metrics_output"),
              ("convert-scbert", "--checkpoint"), ("search", "--space"), ("classify-genes", "--gene_classes")]


@pytest.mark.parametrize("command, flag", FOLDER_FLAGS)
def test_a_file_where_a_folder_is_expected_is_named_as_such(command, flag, tmp_path, capsys):
    a_file = tmp_path / "cells.txt"
    a_file.write_text("x")
    last = _refused([*_minimal_argv(command), flag, str(a_file)], capsys)
    assert f"argument {flag}: {a_file} is a file; expected " in last and "does not exist" not in last, last
    below = _refused([*_minimal_argv(command), flag, str(a_file / "sub")], capsys)
    assert f"{a_file / 'sub'} lies under the file {a_file}" in below, below


@pytest.mark.parametrize("command, flag", FILE_FLAGS)
def test_a_folder_where_a_file_is_expected_is_named_as_such(command, flag, tmp_path, capsys):
    last = _refused([*_minimal_argv(command), flag, str(tmp_path)], capsys)
    assert f"argument {flag}: {tmp_path} is a folder; expected " in last and "does not exist" not in last, last


@pytest.mark.parametrize("command", sorted(cli.COMMANDS))
def test_every_path_flag_says_whether_it_takes_a_file_or_a_folder(command):
    """Only the flags that take either (a token dictionary file or the folder holding one; a
    config.json or its folder; check's --input: a dataset folder or a .h5ad file) keep a bare Path."""
    either = {"config", "token_dictionary", "old_token_dictionary"} | ({"input"} if command == "check" else set())
    bare = [action.option_strings[0] for action in _subparsers()[command]._actions
            if action.type is Path and action.dest not in either]
    assert not bare, f"{command}: give {bare} a file_path/folder_path type from geneformer_peft.commands._common"


def test_a_missing_input_is_left_to_the_command(tmp_path):
    """The types check only the kind of an existing path: a missing input is reported by the
    command with its own message (tests/commands/test_cli.py)."""
    args = cli.build_parser().parse_args(["split", "--input", str(tmp_path / "nope"), "--dataset_name", "x",
                                          "--output_dir", str(tmp_path / "new")])
    assert args.input == tmp_path / "nope"


@pytest.mark.parametrize("kind, make, error, text", [
    ("folder", "file", NotADirectoryError, "is a file; expected a dataset"),
    ("file", "folder", IsADirectoryError, "is a folder; expected a dataset"),
    ("file", None, FileNotFoundError, "does not exist; expected a dataset"),
])
def test_check_path(kind, make, error, text, tmp_path):
    from geneformer_peft.files import check_path

    path = tmp_path / "thing"
    if make == "file":
        path.write_text("x")
    elif make == "folder":
        path.mkdir()
    with pytest.raises(error, match=f"--input {path} {text}"):
        check_path(path, kind, "a dataset", flag="--input")
    assert check_path(tmp_path, "folder", "a folder") == tmp_path


def test_loading_a_file_as_a_saved_dataset_says_it_is_a_file(tmp_path):
    from geneformer_peft.data.dataset_io import load_saved_dataset
    from geneformer_peft.errors import DataError

    a_file = tmp_path / "cells.dataset"
    a_file.write_text("x")
    with pytest.raises(DataError, match="is a file; expected a directory written by save_to_disk"):
        load_saved_dataset(a_file)
