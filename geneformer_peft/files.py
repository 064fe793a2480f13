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

__all__ = ["atomic_directory", "atomic_file", "owner_tag", "temp_owner", "write_json", "write_pickle", "write_text"]

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
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp_name)
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
    except BaseException:
        shutil.rmtree(tmp_dir, ignore_errors=True)
        raise
