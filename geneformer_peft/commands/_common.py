"""Helpers shared by subcommands."""

from __future__ import annotations

import argparse
from pathlib import Path

from geneformer_peft.errors import DataError


def check_output_path(path: Path, *, overwrite: bool, flag: str = "--output") -> None:
    """Refuse an existing output unless ``overwrite``."""
    if path.exists() and not overwrite:
        raise DataError(f"{path}: {flag} exists already; expected a new path (pass --overwrite to replace it)")


def guarded(args: argparse.Namespace, command: str, *, output: str = "output", inputs: tuple[str, ...] = ("input",),
            not_settings: tuple[str, ...] = (), directory: bool = True, flag: str | None = None):
    """The run-safety guard of a command's output ``args.<output>``
    (:func:`geneformer_peft.training.run_safety.guarded_output`): its lock, a temporary path that
    becomes the output when complete, and its provenance (every option except ``output`` and
    ``not_settings``; the files of the options ``inputs`` fingerprinted)."""
    from geneformer_peft.training.run_safety import command_settings, guarded_output

    return guarded_output(getattr(args, output), command=command,
                          settings=command_settings(args, output, *not_settings),
                          inputs={name: getattr(args, name, None) for name in inputs},
                          overwrite=bool(getattr(args, "overwrite", False)), flag=flag or f"--{output}",
                          directory=directory)
