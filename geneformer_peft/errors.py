"""The project's error classes; :mod:`geneformer_peft.cli` maps each to an exit code."""

from __future__ import annotations

import errno
import os
import re

__all__ = ["DataError", "RunInterrupted", "RunTerminated", "Terminated", "TrainingDiverged", "WRITE_ERRNOS",
           "interruption", "os_error_message", "write_errno"]


class DataError(ValueError):
    """Bad input data or files (exit code 2).

    The message names the file, the field, the offending value and what was expected,
    so that a user can fix the input without reading the code.
    """


class TrainingDiverged(RuntimeError):
    """The training loss became NaN or infinite (exit code 3); finished folds keep their outputs."""


class RunInterrupted(KeyboardInterrupt):
    """Ctrl-C (SIGINT) during a run (exit code 130); the message says where, e.g.
    "interrupted during fold 1 epoch 3"."""


class Terminated(KeyboardInterrupt):
    """SIGTERM (sent by ``kill``, ``timeout``, schedulers and containers), raised by the CLI's
    handler (exit code 143). A :class:`KeyboardInterrupt`, so that every cleanup path Ctrl-C
    takes runs for it too."""


class RunTerminated(RunInterrupted):
    """SIGTERM during a run (exit code 143); the message says where, e.g.
    "terminated (SIGTERM) during fold 1 epoch 3"."""


def interruption(error: KeyboardInterrupt, message: str) -> RunInterrupted:
    """``message`` (where the run stopped) as the interruption ``error`` was: a
    :class:`RunTerminated` for SIGTERM, else a :class:`RunInterrupted`.

    Parameters
    ----------
    error : KeyboardInterrupt
        The interruption caught.
    message : str
        E.g. "interrupted during fold 1 epoch 3; rerun the same command to resume".

    Returns
    -------
    RunInterrupted
        To raise in place of ``error``.
    """
    if isinstance(error, (Terminated, RunTerminated)):
        return RunTerminated(message.replace("interrupted", "terminated (SIGTERM)", 1))
    return RunInterrupted(message)


#: errno -> the plain reason a write failed, with ``{path}`` where the file goes (exit code 2)
WRITE_ERRNOS: dict[int, str] = {
    errno.ENOSPC: "no space left on device while writing {path}",
    errno.EDQUOT: "disk quota exceeded while writing {path}",
    errno.EFBIG: "file too large (ulimit -f?) while writing {path}",
    errno.EROFS: "read-only file system: {path}",
    errno.EACCES: "permission denied: {path}",
    errno.EPERM: "operation not permitted: {path}",
}

# "[Errno 28]" (Python, pyarrow), "errno = 28" (HDF5), "os error 28" (Rust: safetensors)
_ERRNO_TEXT = re.compile(r"\[errno (\d+)\]|\berrno = (\d+)|\bos error (\d+)\)", re.IGNORECASE)
_HDF5_FILENAME = re.compile(r"filename = '([^']+)'")


def _chain(error: BaseException):
    seen: set[int] = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        yield error
        error = error.__cause__ or error.__context__


def write_errno(error: BaseException) -> tuple[int, str | None] | None:
    """The errno of :data:`WRITE_ERRNOS` behind ``error`` and the file it names, if any.

    Looks through the exception chain for an :class:`OSError`, then through the messages for
    the errno that libraries writing files put in their own errors (pyarrow, HDF5, safetensors).

    Returns
    -------
    tuple of (int, str or None), or None
        ``(errno, filename)``; ``None`` when ``error`` is not one of these failures.
    """
    for link in _chain(error):
        if isinstance(link, OSError) and link.errno in WRITE_ERRNOS:
            return link.errno, None if link.filename is None else os.fsdecode(link.filename)
    for link in _chain(error):
        for match in _ERRNO_TEXT.finditer(str(link)):
            code = int(next(group for group in match.groups() if group))
            if code in WRITE_ERRNOS:
                named = _HDF5_FILENAME.search(str(link))
                return code, named.group(1) if named else None
    return None


def os_error_message(error: BaseException, path: str | os.PathLike | None = None) -> str | None:
    """One line for a full disk, a file size limit, a read-only file system or a refused
    permission: the plain reason and the path, e.g. "no space left on device while writing
    out/cells.dataset".

    Parameters
    ----------
    error : BaseException
        The error raised (an :class:`OSError`, or a library's error carrying the errno).
    path : path-like, optional
        Named when the error names no file (e.g. the command's output).

    Returns
    -------
    str or None
        ``None`` when ``error`` is not one of :data:`WRITE_ERRNOS`.
    """
    found = write_errno(error)
    if found is None:
        return None
    code, filename = found
    where = filename or (os.fspath(path) if path is not None else "(a file of this command's output)")
    return WRITE_ERRNOS[code].format(path=where)
