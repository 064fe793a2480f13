"""Exceptions raised for bad user input."""

__all__ = ["DataError"]


class DataError(ValueError):
    """Bad input data or files.

    The message names the file, the field, the offending value and what was expected,
    so that a user can fix the input without reading the code.
    """
