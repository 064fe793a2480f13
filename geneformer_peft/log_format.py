"""The one log line format of the project, for the console (set up by :mod:`geneformer_peft.cli`)
and for the ``run.log`` files a run writes."""
from __future__ import annotations

import logging
from pathlib import Path

__all__ = ["LOG_FORMAT", "attach_log_file", "detach_log_file"]

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class _LogFile(logging.FileHandler):
    """A log file that a failed write (full disk, ``ulimit -f``) silences with one warning on
    the console, instead of logging's traceback for every later record: the run goes on, and
    the console still shows every record."""

    failed: str | None = None

    def emit(self, record: logging.LogRecord) -> None:
        if self.failed is None:
            super().emit(record)

    def handleError(self, record: logging.LogRecord) -> None:
        import sys

        error = sys.exc_info()[1]
        if not isinstance(error, OSError):
            super().handleError(record)
            return
        from geneformer_peft.errors import os_error_message

        self.failed = os_error_message(error, self.baseFilename) or str(error)
        logging.getLogger(__name__).warning("not logging to %s any more: %s", self.baseFilename, self.failed)

    def close(self) -> None:
        try:
            super().close()
        except OSError:  # the buffered tail of a full disk: the write that filled it says so
            pass


def attach_log_file(path: str | Path, *, level: int = logging.INFO) -> tuple[logging.Handler, int]:
    """Also log ``level`` and above to ``path`` (appended).

    Returns
    -------
    handler, previous_root_level
        Pass both to :func:`detach_log_file` when done.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handler = _LogFile(path, encoding="utf-8")
    handler.setFormatter(logging.Formatter(LOG_FORMAT))
    handler.setLevel(level)
    root = logging.getLogger()
    root.addHandler(handler)
    previous = root.level
    if root.level > level or root.level == logging.NOTSET:
        root.setLevel(level)
    return handler, previous


def detach_log_file(handler: logging.Handler, previous_root_level: int) -> None:
    """Undo :func:`attach_log_file`."""
    root = logging.getLogger()
    root.removeHandler(handler)
    handler.close()
    root.setLevel(previous_root_level)
