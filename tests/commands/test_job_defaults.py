"""The example script and ``geneformer-peft finetune`` share one set of defaults except the
flags the script's docstring names, and each ``--help`` shows its own true defaults."""
from __future__ import annotations

import argparse
import re

import pytest

from geneformer_peft.commands import finetune

#: flags whose defaults differ between the script and the command (named in the script's docstring)
DOCUMENTED = {"dataset_name": "--dataset_name", "data_path": "--data_path", "model_path": "--model_path",
              "lr": "--lr", "epochs": "--epoch", "early_stopping_patience": "--early_stopping_patience",
              "select_epoch_by": "--select_epoch_by"}


def _defaults(defaults=None) -> dict:
    parser = argparse.ArgumentParser()
    if defaults is None:
        finetune.add_arguments(parser)
    else:
        finetune.add_arguments(parser, defaults=defaults)
    return {action.dest: action.default for action in parser._actions if action.dest != "help"}


def test_defaults_differ_only_where_the_script_says(example_script):
    command, script = _defaults(), _defaults(dict(example_script.EXAMPLE_DEFAULTS))
    differ = {name for name in command if command[name] != script[name]}
    assert differ == set(DOCUMENTED)
    doc = " ".join(example_script.__doc__.split())
    for flag in DOCUMENTED.values():
        assert flag in doc
    assert "--lr 1e-2" in doc and "5e-4" in doc
    assert script["lr"] == 1e-2 and command["lr"] == 5e-4
    assert "--epoch 20" in doc and script["epochs"] == 20 and command["epochs"] == 10
    assert "--early_stopping_patience 0" in doc
    assert script["early_stopping_patience"] == 0 and command["early_stopping_patience"] == 5
    assert "--select_epoch_by loss" in doc
    assert script["select_epoch_by"] == "loss" and command["select_epoch_by"] == "macro_f1"


def _help_line(text: str, flag: str) -> str:
    flat = " ".join(text.split(" options:", 1)[-1].split())  # the option list, not the usage line
    match = re.search(rf"{flag} [A-Z_]+ (.*?)(?= --\w)", flat)
    assert match, f"{flag} not in --help"
    return match.group(1)


@pytest.mark.parametrize("who, lr, epochs", [("command", "0.0005", 10), ("script", "0.01", 20)])
def test_each_help_shows_its_own_defaults(who, lr, epochs, example_script, capsys):
    from geneformer_peft.cli import main

    with pytest.raises(SystemExit):
        if who == "command":
            main(["finetune", "--help"])
        else:
            example_script.main(["--help"])
    text = capsys.readouterr().out
    assert _help_line(text, "--lr").startswith(f"Peak learning rate, a float ({lr}).")
    epochs_help = _help_line(text, "--epoch EPOCHS, --epochs")
    assert f"({epochs})" in epochs_help
