"""The project's error classes; :mod:`geneformer_peft.cli` maps each to an exit code."""

__all__ = ["DataError", "RunInterrupted", "TrainingDiverged"]


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
