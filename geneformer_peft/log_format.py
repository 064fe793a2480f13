"""The one log line format of the project, for the console (set up by :mod:`geneformer_peft.cli`)
and for the ``run.log`` files a run writes."""
from __future__ import annotations

import logging
from pathlib import Path

__all__ = ["LOG_FORMAT", "attach_log_file", "detach_log_file"]

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def attach_log_file(path: str | Path, *, level: int = logging.INFO) -> tuple[logging.Handler, int]:
    """Also log ``level`` and above to ``path`` (appended).

    Returns
    -------
    handler, previous_root_level
        Pass both to :func:`detach_log_file` when done.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(path, encoding="utf-8")
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
