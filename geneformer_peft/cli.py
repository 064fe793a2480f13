"""Command line interface: ``geneformer-peft <command> [options]``.

Each subcommand lives in its own module under :mod:`geneformer_peft.commands` and exposes
``HELP`` (one line), ``add_arguments(parser)`` and ``run(args) -> int``. To add a command,
write such a module and add one line to :data:`COMMANDS`. Command modules import their heavy
dependencies inside ``run`` so that ``--help`` stays fast.

This module is the one place that sets up logging (:data:`~geneformer_peft.log_format.LOG_FORMAT`,
``--log_level`` before or after the command name) and turns the project's errors into exit
codes (:data:`EXIT_CODES`); scripts such as ``example_py/cell_classification_prompt_fold.py``
run a command through :func:`run_command`, so they behave the same.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import logging
import signal
import sys
import threading
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

from geneformer_peft.errors import DataError, RunTerminated, Terminated, TrainingDiverged, os_error_message, write_errno
from geneformer_peft.log_format import LOG_FORMAT

logger = logging.getLogger("geneformer_peft.cli")

__all__ = ["COMMANDS", "EXIT_CODES", "build_parser", "main", "run_command"]

#: command name -> module implementing it
COMMANDS: dict[str, str] = {
    "tokenize": "geneformer_peft.commands.tokenize",
    "split": "geneformer_peft.commands.split",
    "pretrain": "geneformer_peft.commands.pretrain",
    "finetune": "geneformer_peft.commands.finetune",
    "predict": "geneformer_peft.commands.predict",
    "remap-vocab": "geneformer_peft.commands.remap_vocab",
    "convert-scbert": "geneformer_peft.commands.convert_scbert",
    "convert-cellfm": "geneformer_peft.commands.convert_cellfm",
    "embed": "geneformer_peft.commands.embed",
    "perturb": "geneformer_peft.commands.perturb",
    "search": "geneformer_peft.commands.search",
    "classify-genes": "geneformer_peft.commands.classify_genes",
    "check": "geneformer_peft.commands.check",
}

#: the commands whose rerun continues an interrupted run (finished folds, trials or chunks are
#: kept); the others write their output whole or not at all, and a rerun starts again
RESUMABLE = frozenset({"finetune", "classify-genes", "search", "perturb"})

#: what a rerun does after Ctrl-C or SIGTERM, by whether the command resumes
_RERUN = {True: "rerun the same command to resume where it stopped",
          False: "nothing was written (this command writes its output whole or not at all); rerun the same command "
                 "to start again"}

#: error class -> exit code, first match wins. Bad input of any kind (a file that is missing,
#: exists already or is not what was expected, a value out of range) is 2; so is a write that
#: fails for a full disk, ``ulimit -f``, a read-only file system or a refused permission
#: (:data:`~geneformer_peft.errors.WRITE_ERRNOS`). Ctrl-C is 130, SIGTERM 143 (128 + the signal).
EXIT_CODES: tuple[tuple[type[BaseException], int], ...] = (
    (DataError, 2),
    (FileNotFoundError, 2),
    (FileExistsError, 2),
    (NotADirectoryError, 2),
    (IsADirectoryError, 2),
    (ValueError, 2),
    (TrainingDiverged, 3),
)

LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")


def _add_log_level(parser: argparse.ArgumentParser, *, default: Any) -> None:
    parser.add_argument("--log_level", default=default, choices=LOG_LEVELS, help="Logging verbosity (INFO).")


def _add_command(subparsers, name: str, module: ModuleType) -> None:
    sub = subparsers.add_parser(name, help=module.HELP, description=module.__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    module.add_arguments(sub)
    _add_log_level(sub, default=argparse.SUPPRESS)  # given after the command, it wins
    sub.set_defaults(_run=module.run)


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """Build the argument parser with one subparser per entry of :data:`COMMANDS`.

    Parameters
    ----------
    only
        Register this command alone, without importing the others' modules (what :func:`main`
        does once the command line names a command: it parses the same, and a command's
        start-up does not pay for the others').
    """
    parser = argparse.ArgumentParser(
        prog="geneformer-peft",
        description="Parameter-efficient fine-tuning of Geneformer: data preparation, training, evaluation.",
    )
    _add_log_level(parser, default="INFO")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, module_name in COMMANDS.items():
        if only is None or name == only:
            _add_command(subparsers, name, importlib.import_module(module_name))
    return parser


def _command_named(argv: Sequence[str]) -> str | None:
    """The command an argument list names (after the top-level ``--log_level``), or ``None``
    when it names none before anything else (e.g. ``--help``)."""
    i = 0
    while i < len(argv):
        if argv[i] == "--log_level":
            i += 2
        elif argv[i].startswith("--log_level="):
            i += 1
        else:
            return argv[i] if argv[i] in COMMANDS else None
    return None


def setup_logging(level: str) -> None:
    """Console logging in the project's format (once per process; later calls set the level)."""
    root = logging.getLogger()
    if not root.handlers:
        logging.basicConfig(level=level, format=LOG_FORMAT)
    else:
        logging.getLogger("geneformer_peft").setLevel(level)


def exit_code(error: BaseException) -> int | None:
    """The exit code of one of the project's errors (:data:`EXIT_CODES`), or 2 for a failed
    write (:func:`~geneformer_peft.errors.write_errno`), else ``None``."""
    for cls, code in EXIT_CODES:
        if isinstance(error, cls):
            return code
    if write_errno(error) is not None:
        return 2
    return None


#: the output flags of the commands, named by a failed write whose error names no file
_OUTPUT_FLAGS = ("output", "output_dir", "output_path", "build_vocab")


def _output_of(args: argparse.Namespace):
    return next((value for name in _OUTPUT_FLAGS if (value := getattr(args, name, None)) is not None), None)


class _Sigterm:
    """SIGTERM raises :class:`~geneformer_peft.errors.Terminated` in the main thread, once (a
    second SIGTERM during the cleanup is ignored), so it stops a run as Ctrl-C does."""

    def __init__(self) -> None:
        self.received = False

    def __call__(self, signum, frame) -> None:
        if not self.received:
            self.received = True
            raise Terminated()

    @contextlib.contextmanager
    def installed(self) -> Iterator[_Sigterm]:
        # signals reach the main thread only; an ignored SIGTERM or a program's own handler is left alone
        if threading.current_thread() is not threading.main_thread() or \
                signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
            yield self
            return
        previous = signal.signal(signal.SIGTERM, self)
        try:
            yield self
        finally:
            signal.signal(signal.SIGTERM, previous)


def _resumes(args: argparse.Namespace) -> bool:
    """Whether the command being run continues an interrupted run (:data:`RESUMABLE`)."""
    run = getattr(args, "_run", None)
    return any(getattr(sys.modules.get(COMMANDS[name]), "run", None) is run for name in RESUMABLE)


def _execute(args: argparse.Namespace) -> int:
    setup_logging(args.log_level)
    with _Sigterm().installed() as sigterm:
        try:
            return int(args._run(args) or 0)
        except KeyboardInterrupt as error:  # a RunInterrupted says where, e.g. "interrupted during fold 1 epoch 3; ..."
            if sigterm.received or isinstance(error, (Terminated, RunTerminated)):
                logger.error("%s", str(error) or f"terminated (SIGTERM); {_RERUN[_resumes(args)]}")
                return 143
            logger.error("%s", str(error) or f"interrupted; {_RERUN[_resumes(args)]}")
            return 130
        except Exception as error:  # noqa: BLE001 - mapped below, anything else re-raised
            if sigterm.received:  # a library turned the interruption into its own error
                logger.error("terminated (SIGTERM) (%s: %s)", type(error).__name__, error)
                return 143
            code = exit_code(error)
            if code is None:
                raise
            known = any(isinstance(error, cls) for cls, _ in EXIT_CODES)  # else a failed write
            logger.error("%s", error if known else os_error_message(error, _output_of(args)))
            return code


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status (0 success, 2 bad input or a failed write, 3 diverged,
    130 interrupted by Ctrl-C, 143 terminated by SIGTERM)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    return _execute(build_parser(only=_command_named(argv)).parse_args(argv))


def run_command(command: str, argv: Sequence[str] | None = None, *, prog: str | None = None,
                description: str | None = None, defaults: Mapping[str, Any] | None = None) -> int:
    """Run one subcommand as its own program (for scripts), with the same logging and exit codes.

    Parameters
    ----------
    command
        A key of :data:`COMMANDS`, e.g. ``"finetune"``.
    argv
        The arguments (default: ``sys.argv[1:]``).
    prog, description
        Shown by ``--help``.
    defaults
        Passed to the command's ``add_arguments(parser, defaults=...)``: the script's own
        defaults (the command must accept them).
    """
    module = importlib.import_module(COMMANDS[command])
    parser = argparse.ArgumentParser(prog=prog or Path(sys.argv[0]).name, description=description or module.__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    if defaults is None:
        module.add_arguments(parser)
    else:
        module.add_arguments(parser, defaults=dict(defaults))
    _add_log_level(parser, default="INFO")
    parser.set_defaults(_run=module.run)
    return _execute(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
