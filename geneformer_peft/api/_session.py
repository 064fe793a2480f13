"""What a notebook user sees while the API runs: a concise INFO log of the project's loggers
(one line per epoch, fold and result) when nothing else configured logging, tqdm.auto bars,
and no ``datasets`` progress bars ("Saving the dataset ...", "Map ...")."""
from __future__ import annotations

import logging

__all__ = ["CONCISE_FORMAT", "ConciseFilter", "prepare"]

#: the notebook's log line: short, no module path
CONCISE_FORMAT = "%(asctime)s %(message)s"

#: messages that belong in run.log, not on a notebook's screen (multi-line settings dumps)
_VERBOSE_PREFIXES = ("run settings:", "optimizer group", "torch threads:")

_handler: logging.Handler | None = None


class ConciseFilter(logging.Filter):
    """Drops the settings dumps that ``run.log`` keeps (see :data:`_VERBOSE_PREFIXES`)."""

    def filter(self, record: logging.LogRecord) -> bool:  # noqa: D102
        message = record.msg if isinstance(record.msg, str) else ""
        return not message.startswith(_VERBOSE_PREFIXES)


def prepare() -> None:
    """Set up what an API call shows; called by every public function of :mod:`geneformer_peft.api`.

    The ``geneformer_peft`` logger gets one INFO handler with :data:`CONCISE_FORMAT`, only
    when neither it nor the root logger has handlers (a script or notebook that configured
    logging keeps its own); ``datasets``' own progress bars and INFO chatter are switched
    off (the project's bars use ``tqdm.auto``, widgets in a notebook).
    """
    global _handler
    package = logging.getLogger("geneformer_peft")
    if _handler is None and not package.handlers and not logging.getLogger().handlers:
        _handler = logging.StreamHandler()
        _handler.setFormatter(logging.Formatter(CONCISE_FORMAT, datefmt="%H:%M:%S"))
        _handler.addFilter(ConciseFilter())
        package.addHandler(_handler)
        if package.level == logging.NOTSET:
            package.setLevel(logging.INFO)
    try:
        import datasets
    except ImportError:  # pragma: no cover - a core dependency
        return
    datasets.disable_progress_bars()
    datasets.utils.logging.set_verbosity_error()
