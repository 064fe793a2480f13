"""One run per output folder: ``<run_dir>/.lock`` holds the process id, host and start time
of the job that owns the folder.

The lock is created atomically (``os.open`` with ``O_CREAT | O_EXCL``), so of two jobs
started at once exactly one gets it; the other fails at once with :class:`RunLocked`
(exit code 2) naming the holder. A lock left by a process that no longer runs on this
host (killed with SIGKILL, machine crash) is stale: it is taken over with a warning. A
lock held from another host (shared file system) cannot be checked and is never taken
over; the message says to delete it if that job is gone.
"""
from __future__ import annotations

import contextlib
import datetime as _dt
import json
import logging
import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path

from geneformer_peft.errors import DataError

logger = logging.getLogger(__name__)

__all__ = ["LOCK_NAME", "RunLocked", "acquire_lock_file", "acquire_run_lock", "process_runs", "read_lock", "release_run_lock", "run_lock"]

LOCK_NAME = ".lock"
#: a lock file still empty after this many seconds was left by a process killed while creating it
EMPTY_LOCK_GRACE_SECONDS = 10.0


class RunLocked(DataError):
    """Another job holds the run folder (exit code 2)."""


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def process_runs(pid: int, host: str) -> bool | None:
    """Whether process ``pid`` runs on ``host``: True or False on this host, ``None`` for another
    host (it cannot be checked from here)."""
    if host != socket.gethostname():
        return None
    return _pid_alive(pid)


def read_lock(path: Path) -> dict | None:
    """The holder recorded in a lock file, ``{}`` when it is empty or unreadable, ``None`` when absent."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    except OSError:
        return {}
    try:
        holder = json.loads(text)
    except ValueError:
        return {}
    return holder if isinstance(holder, dict) else {}


def _is_stale(path: Path, holder: dict) -> str | None:
    """Why the lock is stale, or ``None`` when its holder may still run."""
    if not holder:
        try:
            age = time.time() - path.stat().st_mtime
        except FileNotFoundError:
            return "it disappeared"
        return f"it is empty since {age:.0f} s" if age > EMPTY_LOCK_GRACE_SECONDS else None
    if holder.get("host") != socket.gethostname():
        return None
    pid = holder.get("pid")
    if isinstance(pid, int) and not _pid_alive(pid):
        return f"process {pid} on {holder['host']} no longer runs"
    return None


def acquire_run_lock(run_dir: str | os.PathLike) -> Path:
    """Take ``<run_dir>/.lock`` for this process; return its path.

    Raises
    ------
    RunLocked
        When a live process (or one on another host) holds it.
    """
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    return acquire_lock_file(run_dir / LOCK_NAME, subject=run_dir,
                             elsewhere="write this run elsewhere with another --output_path or --out_prefix")


def acquire_lock_file(path: str | os.PathLike, *, subject: str | os.PathLike, elsewhere: str) -> Path:
    """Take the lock file ``path`` (guarding ``subject``, a folder or file) for this process.

    Parameters
    ----------
    path : path-like
        The lock file; its folder must exist.
    subject : path-like
        What the lock guards, named in the refusal.
    elsewhere : str
        How to write the result elsewhere, e.g. "choose another --output", for the refusal.

    Returns
    -------
    pathlib.Path
        ``path``.

    Raises
    ------
    RunLocked
        When a live process (or one on another host) holds it.
    """
    path, run_dir = Path(path), subject
    record = {"pid": os.getpid(), "host": socket.gethostname(),
              "started_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")}
    for _ in range(3):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666)
        except FileExistsError:
            holder = read_lock(path)
            if holder is None:  # released meanwhile
                continue
            why = _is_stale(path, holder)
            if why is None:
                who = (f"process {holder.get('pid')} on host {holder.get('host')}, started {holder.get('started_at')}"
                       if holder else "a job that is just starting")
                raise RunLocked(
                    f"{run_dir} is in use by another job ({who}; lock file {path}). Wait for it to finish, or "
                    f"{elsewhere}. If that job is gone "
                    f"(e.g. on another machine), delete {path}") from None
            # take over: move the stale file aside atomically, so only one taker wins
            aside = path.with_name(f"{path.name}.stale-{os.getpid()}")
            try:
                os.replace(path, aside)
            except FileNotFoundError:
                continue
            logger.warning("taking over the stale lock %s (%s; it was %s)", path, why,
                           json.dumps(holder) if holder else "empty")
            with contextlib.suppress(FileNotFoundError):
                os.unlink(aside)
            continue
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            json.dump(record, handle)
            handle.write("\n")
        return path
    raise RunLocked(f"{path}: could not take the lock (it changed hands repeatedly); is another job starting?")


def release_run_lock(path: str | os.PathLike) -> None:
    """Remove the lock if this process holds it."""
    path = Path(path)
    holder = read_lock(path)
    if holder and holder.get("pid") == os.getpid() and holder.get("host") == socket.gethostname():
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)


def other_torchrun_rank() -> bool:
    """Whether this process is a rank other than 0 of a ``torchrun`` launch, read from its
    environment (so before the process group is joined): rank 0 alone locks, guards and writes
    a command's output, and alone prints its summary."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 and int(os.environ.get("RANK", "0")) != 0


@contextlib.contextmanager
def run_lock(run_dir: str | os.PathLike, *, enabled: bool = True) -> Iterator[Path | None]:
    """Hold ``<run_dir>/.lock`` for the block (nothing when ``enabled`` is False, e.g. on
    non-main ranks of a distributed run)."""
    if not enabled:
        yield None
        return
    path = acquire_run_lock(run_dir)
    try:
        yield path
    finally:
        release_run_lock(path)
