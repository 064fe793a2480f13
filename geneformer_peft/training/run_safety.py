"""One run-safety mechanism for every command that writes a result (see ``docs/run_safety.md``).

A command calls :func:`guarded_output` once around the work that makes its output::

    with guarded_output(args.output, command="tokenize", settings=command_settings(args, "output"),
                        inputs={"input": args.input}, overwrite=args.overwrite) as tmp:
        ...write the result to tmp...

which gives it, for a folder or a single file alike:

- **one job per output**: the lock ``<output>.lock`` beside the output (pid, host, start time;
  the lock of :mod:`run_lock`, a stale one taken over), held for the whole command, so a second
  job on the same output is refused at once (exit 2) and the first one's result stays;
- **atomic output**: the result is built under a unique temporary name
  (``<output>.tmp-<pid>@<host>~<random>``, :mod:`geneformer_peft.files`) and moved into place
  only when complete; the existence of the output is checked again at that move, so of two
  writers only one succeeds and the other is refused naming the output;
- **--overwrite keeps the old result until the new one is complete**: an interrupted overwrite
  (Ctrl-C, an error, a full disk) leaves the old result whole;
- **provenance**: the settings and a fingerprint (size, SHA-256) of every input file are
  written as ``provenance.json`` inside a folder output, or as ``<output>.provenance.json``
  beside a file output; an existing output is refused with the settings that differ from it;
- **stale temporaries cleaned**: ``<output>.tmp-*`` / ``.old-*`` left by a process that no
  longer runs on this host (SIGKILL) are removed with a warning (an ``.old-*`` whose output is
  missing, the process having died in the middle of the swap, is moved back instead); those of
  a live process, or of another host, are left alone.

Outputs that a command resumes (the fold folders of ``finetune`` and ``classify-genes``, the
chunks of ``perturb``) hold their lock inside the folder (``<run_dir>/.lock``) and call
:func:`clean_stale_temps` on it.
"""
from __future__ import annotations

import contextlib
import datetime as _dt
import logging
import os
import shutil
import socket
import tempfile
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

from geneformer_peft.errors import DataError
from geneformer_peft.files import atomic_directory, atomic_file, temp_owner, write_json
from geneformer_peft.fingerprints import shared_cache
from geneformer_peft.training.provenance import (
    PROVENANCE_FILE,
    FileHashCache,
    compare_settings,
    differing_keys_message,
    jsonable,
)
from geneformer_peft.training.run_lock import acquire_lock_file, other_torchrun_rank, process_runs, release_run_lock

logger = logging.getLogger(__name__)

__all__ = [
    "NOT_RESULT_ARGS",
    "OutputExists",
    "clean_stale_temps",
    "command_provenance",
    "command_settings",
    "guarded_output",
    "input_fingerprint",
    "output_provenance_path",
    "read_output_provenance",
]

#: command-line options that do not change what a command computes (where and how it runs,
#: what it shows), so they are not part of the recorded settings
NOT_RESULT_ARGS = frozenset({"overwrite", "no_progress", "log_level", "_run", "num_threads", "num_workers"})
LOCK_SUFFIX = ".lock"
PROVENANCE_SUFFIX = ".provenance.json"


class OutputExists(DataError):
    """The output of a command exists already (or appeared while it was written); exit code 2."""


# ----------------------------------------------------------------------------- stale temporaries


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink()


def clean_stale_temps(folder: str | os.PathLike, names: Iterable[str] | None = None) -> list[Path]:
    """Remove the temporary files and folders in ``folder`` left by processes that no longer run.

    Parameters
    ----------
    folder : path-like
        Where to look (not recursive).
    names : iterable of str, optional
        Only the temporaries of these outputs (e.g. ``["cells.dataset"]``); default: all.

    Returns
    -------
    list of pathlib.Path
        What was removed (or moved back into place).

    Notes
    -----
    A temporary of a process that still runs, or of another host (its process cannot be
    checked), is left alone; the latter is reported once.
    """
    folder = Path(folder)
    wanted = None if names is None else set(names)
    cleaned: list[Path] = []
    try:
        entries = sorted(folder.iterdir())
    except (FileNotFoundError, NotADirectoryError):
        return cleaned
    for entry in entries:
        owner = temp_owner(entry.name)
        if owner is None:
            continue
        base, kind, pid, host = owner
        if wanted is not None and base not in wanted:
            continue
        runs = process_runs(pid, host)
        if runs is None:
            logger.warning("%s was left by process %d on host %s, which cannot be checked from here; delete it "
                           "if that job is gone", entry, pid, host)
            continue
        if runs:
            continue
        final = folder / base
        try:
            if kind == "old" and not os.path.lexists(final):
                os.replace(entry, final)
                logger.warning("moved %s back to %s: process %d died while replacing it", entry, final, pid)
            else:
                _remove(entry)
                logger.warning("removed %s, left by process %d on %s that no longer runs", entry, pid, host)
        except FileNotFoundError:  # another job cleaned it meanwhile
            continue
        cleaned.append(entry)
    return cleaned


# ----------------------------------------------------------------------------- provenance


def command_settings(args: Any, *exclude: str) -> dict[str, Any]:
    """The options of a command (an ``argparse.Namespace`` or a mapping) that change its result:
    every option except :data:`NOT_RESULT_ARGS` and ``exclude`` (the output flags), paths made
    absolute."""
    items = dict(args) if isinstance(args, Mapping) else vars(args)
    return {k: jsonable(v) for k, v in sorted(items.items()) if k not in NOT_RESULT_ARGS and k not in exclude}


def input_fingerprint(path: str | os.PathLike | None, cache: FileHashCache | None = None) -> dict[str, Any] | None:
    """Absolute path, and size and SHA-256 of every file of an input (a file, or a folder's files
    except hidden ones, by relative name); ``None`` for no input."""
    if path is None:
        return None
    path = Path(path).expanduser()
    cache = cache or shared_cache()
    if path.is_dir():
        files = sorted(p for p in path.rglob("*")
                       if p.is_file() and not any(part.startswith(".") for part in p.relative_to(path).parts))
        names = [p.relative_to(path).as_posix() for p in files]
    elif path.is_file():
        files, names = [path], [path.name]
    else:
        return {"path": str(path.resolve()), "missing": True}
    return {"path": str(path.resolve()),
            "files": {name: {"size": f.stat().st_size, "sha256": cache.sha256(f)} for name, f in zip(names, files)}}


def command_provenance(command: str, settings: Mapping[str, Any],
                       inputs: Mapping[str, str | os.PathLike | None], *,
                       cache: FileHashCache | None = None) -> dict[str, Any]:
    """The provenance record of a command's output: ``{"command", "settings": {"options", "inputs"},
    "host", "recorded_at"}``; only ``settings`` is compared on a rerun."""
    cache = cache or shared_cache()
    return {"command": command,
            "settings": {"options": jsonable(dict(settings)),
                         "inputs": {name: input_fingerprint(path, cache) for name, path in inputs.items()}},
            "host": socket.gethostname(),
            "recorded_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")}


def output_provenance_path(output: str | os.PathLike, *, directory: bool) -> Path:
    """``<output>/provenance.json`` for a folder output, ``<output>.provenance.json`` for a file."""
    output = Path(output)
    return output / PROVENANCE_FILE if directory else output.with_name(output.name + PROVENANCE_SUFFIX)


def read_output_provenance(output: str | os.PathLike, *, directory: bool) -> dict | None:
    """The provenance record of an output, ``None`` when absent or unreadable."""
    import json

    path = output_provenance_path(output, directory=directory)
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) and isinstance(record.get("settings"), dict) else None


def _exists_message(output: Path, flag: str, command: str, settings: Mapping[str, Any],
                    inputs: Mapping[str, Any], *, directory: bool) -> str:
    message = f"{output}: {flag} exists already; expected a new path (pass --overwrite to replace it"
    message += "; the old result stays until the new one is complete)"
    recorded = read_output_provenance(output, directory=directory)
    if recorded is not None:
        diffs = compare_settings(recorded["settings"], command_provenance(command, settings, inputs)["settings"])
        if diffs:
            message += f". It was made with other settings than this command's:\n{differing_keys_message(diffs)}"
        else:
            message += ". It was made with the same settings and inputs as this command"
    return message


# ----------------------------------------------------------------------------- the guard


@contextlib.contextmanager
def _named_as_output(tmp: Path, output: Path) -> Iterator[None]:
    """A write into the temporary that fails (full disk, ``ulimit -f``) names the file it was
    to become, not the temporary's name, which the user never sees."""
    try:
        yield
    except OSError as error:
        if not error.filename or not Path(error.filename).is_relative_to(tmp):
            raise
        inside = Path(error.filename).relative_to(tmp)
        raise type(error)(error.errno, error.strerror, str(output / inside)) from error


@contextlib.contextmanager
def guarded_output(output: str | os.PathLike, *, command: str, settings: Mapping[str, Any],
                   inputs: Mapping[str, str | os.PathLike | None], overwrite: bool, flag: str = "--output",
                   directory: bool = True) -> Iterator[Path]:
    """Hold the output's lock, and yield a temporary path that becomes the output on success.

    Parameters
    ----------
    output : path-like
        The folder or file the command makes.
    command : str
        The command's name (recorded).
    settings : mapping
        The options that change the result (see :func:`command_settings`).
    inputs : mapping
        Option name -> input file or folder (fingerprinted), ``None`` for an input not given.
    overwrite : bool
        Replace an existing output (only once the new one is complete).
    flag : str, default "--output"
        The option naming the output, for messages.
    directory : bool, default True
        The output is a folder (else a single file; the temporary keeps its suffix).

    Yields
    ------
    pathlib.Path
        A fresh, empty folder (or an empty file) to write the result to.

    Raises
    ------
    OutputExists
        The output exists (without ``overwrite``; naming the settings that differ from its
        recorded ones), or appeared while this command ran (written by a job that does not
        take the lock).
    RunLocked
        Another job holds the output's lock.
    """
    output = Path(output)
    if other_torchrun_rank():  # rank 0 guards and writes the output; what another rank writes is discarded
        with tempfile.TemporaryDirectory(prefix=f"rank{os.environ.get('RANK')}_") as scratch:
            yield Path(scratch) / output.name
        return
    output.parent.mkdir(parents=True, exist_ok=True)
    lock = acquire_lock_file(output.with_name(output.name + LOCK_SUFFIX), subject=output,
                             elsewhere=f"choose another {flag}")
    swapping = False
    try:
        clean_stale_temps(output.parent, [output.name])
        if directory and output.is_dir() and not output.is_symlink() and not any(output.iterdir()):
            output.rmdir()  # an empty folder holds no result
        if os.path.lexists(output):
            if not overwrite:
                raise OutputExists(_exists_message(output, flag, command, settings, inputs, directory=directory))
            if output.is_dir() != directory:
                raise DataError(f"{output}: {flag} is a {'folder' if output.is_dir() else 'file'}; expected "
                                f"{'a folder' if directory else 'a file'} (not replaced)")
        record = command_provenance(command, settings, inputs)
        if directory:
            with atomic_directory(output, overwrite=overwrite) as tmp:
                with _named_as_output(Path(tmp), output):
                    yield tmp
                write_json(tmp / PROVENANCE_FILE, record)
                swapping = True
        else:
            beside = output_provenance_path(output, directory=False)
            with atomic_file(output, suffix=output.suffix, overwrite=overwrite) as tmp_name:
                with _named_as_output(Path(tmp_name), output):
                    yield Path(tmp_name)
                with contextlib.suppress(FileNotFoundError):
                    beside.unlink()  # it describes the file about to be replaced
                swapping = True
            write_json(beside, record)
    except FileExistsError as error:
        if not swapping:
            raise
        raise OutputExists(f"{output}: {flag} was written by another job while this one ran; this command's "
                           "result was not kept (the other one stays)") from error
    finally:
        release_run_lock(lock)
