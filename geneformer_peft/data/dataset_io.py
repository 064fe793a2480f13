"""Saving and loading ``datasets.Dataset`` directories safely."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

from geneformer_peft.errors import DataError
from geneformer_peft.files import atomic_directory, wrong_kind

__all__ = ["load_saved_dataset", "save_dataset_atomically"]


def load_saved_dataset(path: str | Path):
    """Load a ``datasets.Dataset`` written by ``save_to_disk``.

    Raises
    ------
    DataError
        When ``path`` does not exist, is not a saved dataset, or holds a ``DatasetDict``.
    """
    import datasets

    path = Path(path)
    if not path.is_dir():
        problem = wrong_kind(path, "folder") or "dataset directory does not exist"
        raise DataError(f"{path}: {problem}; expected a directory written by save_to_disk")
    if not ((path / "state.json").is_file() and (path / "dataset_info.json").is_file()):
        if (path / "dataset_dict.json").is_file():
            raise DataError(f"{path}: holds a DatasetDict; expected a single datasets.Dataset")
        raise DataError(
            f"{path}: directory is not a dataset saved with save_to_disk (no state.json / "
            "dataset_info.json); expected a saved datasets.Dataset"
        )
    try:
        state = json.loads((path / "state.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise DataError(f"{path}: state.json is unreadable ({error}); expected a dataset saved with save_to_disk") \
            from None
    if isinstance(state, dict) and not state.get("_data_files"):
        raise DataError(f"{path}: the dataset holds no cells (saved with zero data files); expected at least one "
                        "cell in every split")
    try:
        return datasets.load_from_disk(str(path))
    except (OSError, ValueError, IndexError, KeyError) as error:
        raise DataError(f"{path}: could not be read as a saved dataset ({type(error).__name__}: {error}); "
                        "expected a complete folder written by save_to_disk") from None


@contextlib.contextmanager
def _no_save_bar():
    """Without datasets' "Saving the dataset" bar (a fold split saves 3 x K of them; the caller logs
    what was written), its previous setting restored afterwards."""
    from datasets.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars

    was_disabled = are_progress_bars_disabled()
    disable_progress_bars()
    try:
        yield
    finally:
        if not was_disabled:
            enable_progress_bars()


def save_dataset_atomically(dataset, path: str | Path) -> None:
    """``save_to_disk`` into a sibling temporary directory (a unique name,
    :func:`geneformer_peft.files.atomic_directory`), then move it into place.

    An interrupted save never leaves a half-written dataset at ``path``; an existing
    ``path`` is replaced once the new one is complete (callers decide whether that is allowed).
    """
    with atomic_directory(path, overwrite=True) as tmp, _no_save_bar():
        dataset.save_to_disk(str(tmp))
