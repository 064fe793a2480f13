"""Write-once files: every file is written under a temporary name in its final folder and
moved into place (:func:`os.replace`), so a reader sees the old file or the complete new
one, never half a file; folders are built the same way (:func:`atomic_directory`).

Used by every stage that writes results (fold outputs, checkpoints put on a new
vocabulary, analysis tables), so it sits below them all.
"""
from __future__ import annotations

import contextlib
import json
import os
import pickle
import re
import shutil
import socket
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["atomic_directory", "atomic_file", "check_path", "owner_tag", "temp_owner", "wrong_kind", "write_json",
           "write_pickle", "write_text", "write_torch"]

#: ``<name>.tmp-<pid>@<host>~<random>`` (and ``.old-``): the temporary names carry their writer, so
#: that a later run can tell the debris of a dead process from the work of a live one
_TEMP_NAME = re.compile(r"^\.?(?P<base>.+?)\.(?P<kind>tmp|old)-(?P<pid>\d+)@(?P<host>[^~/]+)~")


def owner_tag() -> str:
    """``<pid>@<host>`` of this process, as written into temporary names."""
    return f"{os.getpid()}@{socket.gethostname()}"


def temp_owner(name: str) -> tuple[str, str, int, str] | None:
    """``(base name, "tmp" or "old", pid, host)`` of a temporary name written by :func:`atomic_file`
    or :func:`atomic_directory`, ``None`` for any other name."""
    match = _TEMP_NAME.match(name)
    if match is None:
        return None
    return match["base"], match["kind"], int(match["pid"]), match["host"]



def _umask() -> int:
    """The process's umask (read from /proc on Linux; elsewhere set and restored at once)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def file_mode() -> int:
    """Mode of a new file under the user's umask (``0o666 & ~umask``: 644 with the usual 022)."""
    return 0o666 & ~_umask()


def directory_mode() -> int:
    """Mode of a new folder under the user's umask (``0o777 & ~umask``)."""
    return 0o777 & ~_umask()


def _apply_umask(folder: Path) -> None:
    """Give ``folder`` and everything in it the modes of files created normally (``mkdtemp``
    makes 0700 folders and ``mkstemp`` 0600 files, awkward on a shared lab server)."""
    files, dirs = file_mode(), directory_mode()
    os.chmod(folder, dirs)
    for root, subdirs, names in os.walk(folder):
        for name in subdirs:
            os.chmod(os.path.join(root, name), dirs)
        for name in names:
            path = os.path.join(root, name)
            if not os.path.islink(path):
                os.chmod(path, files)


def _name_the_path(error: BaseException, path: Path) -> None:
    """Give an OSError that names no file (a write into an open file: full disk, ``ulimit -f``)
    the path being written, so that its message and the CLI's say where."""
    if isinstance(error, OSError) and error.errno is not None and error.filename is None:
        error.filename = str(path)


# ----------------------------------------------------------------------------- paths


def wrong_kind(path: str | os.PathLike, kind: str) -> str | None:
    """"is a file" or "is a folder" when ``path`` exists as the other ``kind`` ("file" or
    "folder") than expected, "lies under the file <f>" when a folder above it is a file, else
    ``None`` (also when it does not exist)."""
    if kind not in ("file", "folder"):
        raise ValueError(f"kind {kind!r}; expected 'file' or 'folder'")
    path = Path(path)
    if kind == "folder" and path.exists() and not path.is_dir():
        return "is a file"
    if kind == "file" and path.is_dir():
        return "is a folder"
    if not path.exists():
        above = next((parent for parent in path.parents if parent.exists()), None)
        if above is not None and not above.is_dir():
            return f"lies under the file {above}"
    return None


def check_path(path: str | os.PathLike, kind: str, expected: str, *, flag: str | None = None) -> Path:
    """Check that an input ``path`` exists and is a ``kind`` ("file" or "folder"); the one check
    behind messages such as "--input x.h5ad is a file; expected a saved dataset folder".

    Parameters
    ----------
    path : path-like
        The input.
    kind : {"file", "folder"}
        What it must be.
    expected : str
        What the message says is expected, e.g. "a folder written by save_to_disk".
    flag : str, optional
        The option that gave the path, named first in the message.

    Returns
    -------
    pathlib.Path
        ``path``.

    Raises
    ------
    FileNotFoundError, NotADirectoryError, IsADirectoryError
        ``path`` is missing, a file where a folder is expected, a folder where a file is (exit code 2).
    """
    path = Path(path)
    name = f"{flag} {path}" if flag else str(path)
    problem = wrong_kind(path, kind)
    if problem is not None:
        error = NotADirectoryError if kind == "folder" else IsADirectoryError
        raise error(f"{name} {problem}; expected {expected}")
    if not path.exists():
        raise FileNotFoundError(f"{name} does not exist; expected {expected}")
    return path


# ----------------------------------------------------------------------------- files


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike, *, suffix: str = ".tmp", overwrite: bool = True) -> Iterator[str]:
    """Yield a temporary file name beside ``path``; on success it is moved onto ``path``
    (mode ``0o666 & ~umask``, as a file created normally), on failure removed, so ``path`` is
    never half-written.

    The temporary name is ``.<name>.tmp-<pid>@<host>~<random><suffix>``. With ``overwrite=False``
    the move fails with :class:`FileExistsError` when ``path`` appeared meanwhile (another job
    writing the same file), checked atomically where the file system has hard links."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.tmp-{owner_tag()}~", suffix=suffix)
    os.close(fd)
    try:
        yield tmp_name
        os.chmod(tmp_name, file_mode())
        if overwrite:
            os.replace(tmp_name, path)
        else:
            _move_new(tmp_name, path)
    except BaseException as error:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp_name)
        _name_the_path(error, path)
        raise


def _move_new(tmp_name: str, path: Path) -> None:
    """Move ``tmp_name`` onto ``path`` only if ``path`` does not exist (link, then unlink)."""
    appeared = FileExistsError(f"{path} appeared while it was being written (another job writing the same "
                               "output?); its new content was not kept")
    try:
        os.link(tmp_name, path)
    except FileExistsError:
        raise appeared from None
    except OSError:  # no hard links here (some network or FAT file systems): check, then move
        if os.path.lexists(path):
            raise appeared from None
        os.replace(tmp_name, path)
        return
    os.unlink(tmp_name)


def _atomic_write(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` through a temporary file in the same directory."""
    with atomic_file(path) as tmp_name, open(tmp_name, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    return Path(path)


def _json_default(obj: Any) -> Any:
    """Convert numpy scalars and arrays, paths and sets for :func:`json.dumps`."""
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    if isinstance(obj, (set, frozenset)):
        return sorted(obj)
    raise TypeError(f"object of type {type(obj).__name__} is not JSON serialisable: {obj!r}")


def write_text(path: str | os.PathLike, text: str, *, encoding: str = "utf-8") -> Path:
    """Write ``text`` to ``path`` atomically.

    Parameters
    ----------
    path : path-like
        Destination; parent folders are created.
    text : str
        Content.
    encoding : str, default "utf-8"
        Text encoding.

    Returns
    -------
    pathlib.Path
        ``path``.
    """
    if not isinstance(text, str):
        raise ValueError(f"text must be a str, got {type(text).__name__}")
    return _atomic_write(path, text.encode(encoding))


def write_json(path: str | os.PathLike, obj: Any, *, indent: int = 2, sort_keys: bool = False) -> Path:
    """Serialise ``obj`` as JSON and write it to ``path`` atomically.

    numpy scalars and arrays, paths and sets are converted. The object is serialised
    completely before anything touches the disk, so an unserialisable object leaves an
    existing file unchanged.

    Parameters
    ----------
    path : path-like
        Destination.
    obj : object
        JSON-serialisable object.
    indent : int, default 2
        Indentation.
    sort_keys : bool, default False
        Write the keys of every mapping in sorted order.

    Returns
    -------
    pathlib.Path
        ``path``.
    """
    text = json.dumps(obj, indent=indent, sort_keys=sort_keys, default=_json_default) + "\n"
    return write_text(path, text)


def write_pickle(path: str | os.PathLike, obj: Any) -> Path:
    """Pickle ``obj`` (highest protocol) and write it to ``path`` atomically.

    Parameters
    ----------
    path : path-like
        Destination.
    obj : object
        Picklable object.

    Returns
    -------
    pathlib.Path
        ``path``.
    """
    return _atomic_write(path, pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL))


def write_torch(path: str | os.PathLike, obj: Any) -> Path:
    """``torch.save`` ``obj`` to ``path`` atomically; the project's one way to write a torch file.

    A write that fails raises :class:`OSError` naming ``path`` with its errno (ENOSPC for a full
    disk, EFBIG beyond ``ulimit -f``), where torch alone raises "unexpected pos 7552 vs 7446"
    (:func:`transformerslocal.modeling_utils.save_torch`, which the model code below this
    package uses).

    Parameters
    ----------
    path : path-like
        Destination; parent folders are created.
    obj : object
        What ``torch.save`` takes (a state dict, a checkpoint payload).

    Returns
    -------
    pathlib.Path
        ``path``.
    """
    from transformerslocal.modeling_utils import save_torch

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return save_torch(obj, path)


# ----------------------------------------------------------------------------- folders


@contextlib.contextmanager
def atomic_directory(final_path: str | os.PathLike, *, overwrite: bool = False) -> Iterator[Path]:
    """Build a folder under a temporary name and move it into place on success.

    Yields ``<final_path>.tmp-<pid>@<host>~<random>`` (a fresh, empty folder beside ``final_path``).
    When the block finishes, that folder is renamed to ``final_path``; when the block
    raises, it is removed and ``final_path`` is left as it was.

    Parameters
    ----------
    final_path : path-like
        Where the finished folder should end up.
    overwrite : bool, default False
        Replace an existing ``final_path``. The old folder is removed only after the
        new one is in place.

    Yields
    ------
    pathlib.Path
        The temporary folder to write into.

    Raises
    ------
    FileExistsError
        If ``final_path`` exists and ``overwrite`` is False (checked before the block runs
        and again before the rename).
    """
    final_path = Path(final_path)
    if final_path.exists() and not overwrite:
        raise FileExistsError(f"{final_path} already exists; pass overwrite=True to replace it")
    final_path.parent.mkdir(parents=True, exist_ok=True)
    tmp_dir = Path(tempfile.mkdtemp(dir=final_path.parent, prefix=f"{final_path.name}.tmp-{owner_tag()}~"))
    try:
        yield tmp_dir
        _apply_umask(tmp_dir)
        if final_path.exists():
            if not overwrite:
                raise FileExistsError(
                    f"{final_path} appeared while it was being written (another job writing the same output?); "
                    "its new content was not kept"
                )
            old = Path(tempfile.mkdtemp(dir=final_path.parent, prefix=f"{final_path.name}.old-{owner_tag()}~"))
            os.rmdir(old)
            os.replace(final_path, old)
            os.replace(tmp_dir, final_path)
            if old.is_dir() and not old.is_symlink():
                shutil.rmtree(old)
            else:
                old.unlink()
        else:
            os.replace(tmp_dir, final_path)
    except BaseException as error:
        shutil.rmtree(tmp_dir, ignore_errors=True)
        _name_the_path(error, final_path)
        raise
