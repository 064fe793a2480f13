"""Helpers shared by subcommands."""

from __future__ import annotations

from pathlib import Path

from geneformer_peft.errors import DataError


def check_output_path(path: Path, *, overwrite: bool, flag: str = "--output") -> None:
    """Refuse an existing output unless ``overwrite``."""
    if path.exists() and not overwrite:
        raise DataError(f"{path}: {flag} exists already; expected a new path (pass --overwrite to replace it)")
