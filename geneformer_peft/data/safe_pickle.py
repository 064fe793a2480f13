"""Reading Geneformer's pickled dictionaries without running code from the file.

Geneformer ships its token, gene-median and gene-name dictionaries as pickles. ``pickle.load``
of a file from anywhere can run any code the file names, so every dictionary here goes through
:func:`load_plain_pickle`: an unpickler that resolves only the few globals a plain dict of
strings and numbers needs (numpy scalars are pickled as ``numpy.core.multiarray.scalar`` of a
``numpy.dtype``) and refuses every other one before it is imported, let alone called.
"""
from __future__ import annotations

import io
import pickle
from pathlib import Path
from typing import Any

import numpy as np

from geneformer_peft.errors import DataError

__all__ = ["ALLOWED_GLOBALS", "load_plain_pickle", "loads_plain_pickle"]

#: (module, name) pairs a plain pickled dict of numpy scalars refers to; numpy 2 writes ``numpy._core``.
ALLOWED_GLOBALS: frozenset[tuple[str, str]] = frozenset({
    ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "scalar"),
    ("numpy", "dtype"),
})

_PLAIN = (str, int, float, bool, type(None), np.integer, np.floating, np.bool_, np.str_)


def _numpy_scalar():
    """numpy's scalar constructor (``numpy.core`` became ``numpy._core`` in numpy 2; either serves both names)."""
    try:
        from numpy._core import multiarray
    except ImportError:  # numpy < 2
        from numpy.core import multiarray
    return multiarray.scalar


class _RestrictedUnpickler(pickle.Unpickler):
    def __init__(self, handle, source: str) -> None:
        super().__init__(handle)
        self.source = source

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in ALLOWED_GLOBALS:
            raise DataError(f"{self.source}: the pickle refers to {module}.{name}, which a plain dictionary never "
                            "does; it was not loaded (a pickle can run code: only dicts of strings and numbers are "
                            "read). Expected a dict of gene id -> number, or use a .json dictionary")
        if module == "numpy":
            return np.dtype
        return _numpy_scalar()


def _check_plain(obj: Any, source: str) -> None:
    """Refuse anything but a dict (or list/tuple) of plain strings and numbers."""
    if isinstance(obj, dict):
        for key, value in obj.items():
            if not isinstance(key, _PLAIN) or not isinstance(value, _PLAIN):
                bad = key if not isinstance(key, _PLAIN) else value
                raise DataError(f"{source}: entry {key!r} holds a {type(bad).__name__}; expected a dict of strings "
                                "and numbers")
        return
    raise DataError(f"{source}: the pickle holds a {type(obj).__name__}; expected a dict")


def loads_plain_pickle(data: bytes, *, source: str = "<bytes>") -> dict:
    """Unpickle ``data`` as :func:`load_plain_pickle` does; ``source`` names it in errors."""
    try:
        obj = _RestrictedUnpickler(io.BytesIO(data), source).load()
    except DataError:
        raise
    except (pickle.UnpicklingError, EOFError, AttributeError, ImportError, IndexError, TypeError, ValueError,
            KeyError, MemoryError, OverflowError) as error:
        raise DataError(f"{source}: not a readable pickle ({type(error).__name__}: {error}); expected a pickled "
                        "dict of gene id -> number") from error
    _check_plain(obj, source)
    return obj


def load_plain_pickle(path: str | Path) -> dict:
    """Load a pickled dict of strings and numbers without running code from the file.

    Parameters
    ----------
    path
        A pickle such as Geneformer's ``token_dictionary.pkl``, ``gene_median_dictionary.pkl``
        or ``gene_name_id_dict.pkl``.

    Returns
    -------
    dict
        The dictionary; numpy scalar keys or values stay numpy scalars (callers convert).

    Raises
    ------
    DataError
        When the file names any global besides numpy's scalar and dtype (nothing it names is
        imported or called), is not a pickle, or holds anything but a dict of strings and numbers.
    """
    path = Path(path)
    try:
        data = path.read_bytes()
    except IsADirectoryError as error:
        raise DataError(f"{path}: is a folder; expected a pickle file") from error
    except FileNotFoundError as error:
        raise DataError(f"{path}: file does not exist; expected a pickle file") from error
    return loads_plain_pickle(data, source=str(path))
