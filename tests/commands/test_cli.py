"""One command-line path: every subcommand fails on a missing input with exit 2 and a message
naming the path (no traceback), ``--log_level`` works for every subcommand, and the project's
errors map to their exit codes."""
from __future__ import annotations

import logging
import subprocess
import sys
from pathlib import Path

import pytest

from geneformer_peft import cli
from geneformer_peft.errors import DataError, TrainingDiverged

ROOT = Path(__file__).resolve().parents[2]
TINY = ROOT / "Pretrain_ckpts" / "geneformer-tiny-example"


def _missing_input_argv(command: str, missing: Path, out: Path) -> list[str]:
    """argv of ``command`` whose main input is ``missing`` (every other input valid)."""
    return {
        "tokenize": ["tokenize", "--input", str(missing), "--output", str(out),
                     "--token_dictionary", str(TINY / "token_dictionary.pkl"),
                     "--gene_median_dictionary", str(TINY / "gene_median_dictionary.pkl")],
        "split": ["split", "--input", str(missing), "--dataset_name", "x", "--output_dir", str(out)],
        "pretrain": ["pretrain", "--input", str(missing), "--output_dir", str(out), "--model_path", str(TINY)],
        "finetune": ["finetune", "--dataset_name", "synthetic", "--data_path", str(ROOT / "example_py" / "data"),
                     "--model_path", str(missing), "--output_path", str(out)],
        "predict": ["predict", "--model_path", str(TINY), "--input", str(missing), "--output", str(out / "p.csv")],
        "remap-vocab": ["remap-vocab", "--model_path", str(missing), "--output_dir", str(out),
                        "--token_dictionary", str(TINY / "token_dictionary.pkl")],
    }[command]


@pytest.mark.parametrize("command", ["tokenize", "split", "pretrain", "finetune", "predict", "remap-vocab"])
def test_missing_input_exits_2_naming_the_path(command, tmp_path, caplog):
    missing = tmp_path / "does_not_exist.h5ad" if command == "tokenize" else tmp_path / "does_not_exist"
    with caplog.at_level(logging.ERROR):
        status = cli.main(_missing_input_argv(command, missing, tmp_path / "out"))
    assert status == 2
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert any(str(missing) in message for message in errors), errors


def test_every_registered_command_is_covered_by_the_missing_input_test():
    from geneformer_peft.commands import __doc__ as _  # noqa: F401  (the package imports)

    covered = {"tokenize", "split", "pretrain", "finetune", "predict", "remap-vocab"}
    extra = set(cli.COMMANDS) - covered
    # commands added later carry their own missing-input test in tests/commands or tests/<stage>
    for name in extra:
        module = cli.COMMANDS[name].rsplit(".", 1)[1]
        tests = list((ROOT / "tests").rglob("test_*.py"))
        assert any(f"\"{name}\"" in t.read_text() or f"'{name}'" in t.read_text() for t in tests), (
            f"subcommand {name!r} ({module}) has no test calling it")


def test_missing_input_in_a_subprocess_has_no_traceback(tmp_path):
    missing = tmp_path / "nope.dataset"
    proc = subprocess.run([sys.executable, "-m", "geneformer_peft.cli", "split", "--input", str(missing),
                           "--dataset_name", "x", "--output_dir", str(tmp_path / "o")],
                          capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 2
    assert str(missing) in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.parametrize("where", ["before", "after"])
def test_log_level_before_or_after_the_command(where, tmp_path, caplog):
    argv = _missing_input_argv("split", tmp_path / "nope", tmp_path / "o")
    argv = ["--log_level", "ERROR", *argv] if where == "before" else [*argv, "--log_level", "ERROR"]
    args = cli.build_parser().parse_args(argv)
    assert args.log_level == "ERROR"
    with caplog.at_level(logging.ERROR):
        assert cli.main(argv) == 2


def test_log_level_after_the_command_wins():
    args = cli.build_parser().parse_args(["--log_level", "ERROR", "split", "--input", "a", "--dataset_name", "x",
                                          "--output_dir", "o", "--log_level", "DEBUG"])
    assert args.log_level == "DEBUG"


@pytest.mark.parametrize("error, code", [
    (DataError("bad"), 2), (FileNotFoundError("gone"), 2), (FileExistsError("there"), 2), (ValueError("v"), 2),
    (TrainingDiverged("nan"), 3), (KeyboardInterrupt(), 130),
])
def test_errors_map_to_exit_codes(error, code, monkeypatch, caplog):
    import geneformer_peft.commands.split as split_command

    def fail(args):
        raise error

    monkeypatch.setattr(split_command, "run", fail)
    with caplog.at_level(logging.ERROR):
        assert cli.main(["split", "--input", "a", "--dataset_name", "x", "--output_dir", "o"]) == code
    assert caplog.records, "the error must be logged"


def test_an_unexpected_error_is_not_hidden(monkeypatch):
    import geneformer_peft.commands.split as split_command

    def fail(args):
        raise RuntimeError("a bug")

    monkeypatch.setattr(split_command, "run", fail)
    with pytest.raises(RuntimeError, match="a bug"):
        cli.main(["split", "--input", "a", "--dataset_name", "x", "--output_dir", "o"])


def test_script_runs_through_the_cli(tmp_path, caplog):
    """The example script is `finetune` with other defaults: same errors, same exit codes."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("example_main", ROOT / "example_py" /
                                                  "cell_classification_prompt_fold.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    missing = tmp_path / "nope"
    with caplog.at_level(logging.ERROR):
        assert module.main(["--model_path", str(missing), "--output_path", str(tmp_path)]) == 2
    assert any(str(missing) in r.getMessage() for r in caplog.records)


def test_a_command_line_imports_the_command_it_names_alone(tmp_path):
    """Start-up cost: ``geneformer-peft tokenize ...`` builds tokenize's parser only, without
    importing the other command modules (it parses the same); ``--help`` still lists them all."""
    import job_factories as jf

    code = ("import atexit, sys\n"
            "atexit.register(lambda: print(sorted(m for m in sys.modules if m.startswith('geneformer_peft.commands.')"
            " and not m.split('.')[-1].startswith('_'))))\n"
            "from geneformer_peft import cli\n"
            "sys.exit(cli.main(['--log_level', 'ERROR', 'tokenize', '--input', sys.argv[1], '--output', sys.argv[2]]))\n")
    proc = subprocess.run([sys.executable, "-c", code, str(tmp_path / "none.h5ad"), str(tmp_path / "out.dataset")],
                          capture_output=True, text=True, env=jf._subprocess_env(), cwd=jf.ROOT, timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stdout.strip().splitlines()[-1] == "['geneformer_peft.commands.tokenize']"
    helped = subprocess.run([sys.executable, "-m", "geneformer_peft.cli", "--help"], capture_output=True, text=True,
                            env=jf._subprocess_env(), cwd=jf.ROOT, timeout=120)
    from geneformer_peft.cli import COMMANDS

    assert all(name in helped.stdout for name in COMMANDS)
