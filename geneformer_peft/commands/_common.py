"""Helpers shared by subcommands: the output check and the argument types of their flags.

Each type checks a flag's value when the command line is parsed, so a bad value fails at once
and argparse's message names the flag, e.g. ``argument --seed: expected an integer >= 0, got -1``
(exit code 2), before any data is read.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable
from pathlib import Path

from geneformer_peft.errors import DataError
from geneformer_peft.files import wrong_kind

__all__ = ["CHECKPOINT", "DATASET", "OUTPUT_FOLDER", "SEED", "boolean", "check_output_path", "file_path", "float_in", "fold_list", "folder_path", "int_in",
           "non_negative_float", "non_negative_int", "positive_float", "positive_int"]


def check_output_path(path: Path, *, overwrite: bool, flag: str = "--output") -> None:
    """Refuse an existing output unless ``overwrite``."""
    if path.exists() and not overwrite:
        raise DataError(f"{path}: {flag} exists already; expected a new path (pass --overwrite to replace it)")


def int_in(low: int, high: int | None = None, *, expected: str | None = None) -> Callable[[str], int]:
    """An argparse type: an integer in ``[low, high]`` (``high=None``: no upper bound).

    Parameters
    ----------
    low, high : int
        The bounds, both included.
    expected : str, optional
        What the message says is expected (default: "an integer >= low" or "an integer in [low, high]").
    """
    expected = expected or (f"an integer >= {low}" if high is None else f"an integer in [{low}, {high}]")

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}") from None
        if value < low or (high is not None and value > high):
            raise argparse.ArgumentTypeError(f"expected {expected}, got {value}")
        return value

    parse.__name__ = "integer"
    return parse


def float_in(low: float, high: float = math.inf, *, low_open: bool = False, high_open: bool = False,
             expected: str | None = None) -> Callable[[str], float]:
    """An argparse type: a finite number between ``low`` and ``high`` (each bound included unless open).

    Parameters
    ----------
    low, high : float
        The bounds; ``high=inf`` for none.
    low_open, high_open : bool
        Exclude that bound.
    expected : str, optional
        What the message says is expected (default: from the bounds, e.g. "a number in [0, 1)").
    """
    if expected is None:
        if high == math.inf:
            expected = f"a number {'>' if low_open else '>='} {low:g}"
        else:
            expected = f"a number in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}") from None
        above = value > low if low_open else value >= low
        below = value < high if high_open else value <= high
        if not (math.isfinite(value) and above and below):
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text}")
        return value

    parse.__name__ = "number"
    return parse


non_negative_int = int_in(0)
positive_int = int_in(1)
non_negative_float = float_in(0.0)
positive_float = float_in(0.0, low_open=True)
#: a random seed (numpy takes 0 .. 2**32 - 1)
SEED = int_in(0, 2**32 - 1, expected="an integer >= 0 (below 2**32)")


def fold_list(text: str) -> list[int]:
    """An argparse type: comma-separated fold numbers, e.g. ``0,1,2``, each >= 0 and given once."""
    parts = [part.strip() for part in text.split(",") if part.strip()]
    try:
        folds = [int(part) for part in parts]
    except ValueError:
        folds = []
    if not folds:
        raise argparse.ArgumentTypeError(f"expected comma-separated fold numbers, e.g. 0,1,2; got {text!r}")
    negative = [fold for fold in folds if fold < 0]
    if negative:
        raise argparse.ArgumentTypeError(f"expected fold numbers >= 0, got {text!r}")
    repeated = sorted({fold for fold in folds if folds.count(fold) > 1})
    if repeated:
        raise argparse.ArgumentTypeError(f"fold {', '.join(map(str, repeated))} given more than once in {text!r}; "
                                         "expected each fold once")
    return folds


def boolean(text: str) -> bool:
    """An argparse type: true/false (also 1/0, yes/no, on/off)."""
    value = str(text).strip().lower()
    if value in ("1", "true", "yes", "y", "on"):
        return True
    if value in ("0", "false", "no", "n", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def _path_of_kind(kind: str, expected: str) -> Callable[[str], Path]:
    def parse(text: str) -> Path:
        path = Path(text)
        problem = wrong_kind(path, kind)
        if problem is not None:
            raise argparse.ArgumentTypeError(f"{path} {problem}; expected {expected}")
        return path

    parse.__name__ = kind
    return parse


def folder_path(expected: str) -> Callable[[str], Path]:
    """An argparse type: a path that, if it exists, is a folder (input or output); a file there is
    refused as "x is a file; expected <expected>" (a missing input is the command's to report).

    Parameters
    ----------
    expected : str
        What the flag takes, e.g. "a checkpoint folder (config.json and weights)".
    """
    return _path_of_kind("folder", expected)


def file_path(expected: str) -> Callable[[str], Path]:
    """An argparse type: a path that, if it exists, is a file; a folder there is refused as
    "x is a folder; expected <expected>" (see :func:`folder_path`)."""
    return _path_of_kind("file", expected)


#: the folder kinds most flags take
CHECKPOINT = folder_path("a checkpoint folder (config.json and weights)")
DATASET = folder_path("a saved dataset folder (written by tokenize, split or save_to_disk)")
OUTPUT_FOLDER = folder_path("a folder to write into (or a new path)")


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
