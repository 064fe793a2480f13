"""``COLUMN=VALUE[,VALUE...]`` cell filters (``perturb --filter``, ``tokenize --obs_filter``).

Values are separated by commas; a value holding a comma (or a double quote) is written in
double quotes, as in a CSV line: ``cell_type="CD4+, naive T cell",B cell`` selects two labels.
Without quotes the text reads as before (``cell_type=T cell,B cell``).
"""
from __future__ import annotations

import csv
import io
from collections.abc import Iterable

from geneformer_peft.errors import DataError

__all__ = ["format_column_values", "parse_column_values"]


def parse_column_values(item: str, *, flag: str) -> tuple[str, list[str]]:
    """``'cell_type="A, b",C'`` -> ``("cell_type", ["A, b", "C"])``.

    Parameters
    ----------
    item : str
        One ``COLUMN=VALUE[,VALUE...]`` filter.
    flag : str
        The option it came from, named in messages (e.g. ``--filter``).

    Returns
    -------
    tuple of (str, list of str)
        The column and its values (surrounding spaces removed), in the order given.

    Raises
    ------
    DataError
        For an entry without ``=`` or a column name, or unbalanced quotes.
    """
    column, sep, values = item.partition("=")
    if not sep or not column.strip():
        raise DataError(f"{flag} {item!r} is not COLUMN=VALUE; expected e.g. {flag} cell_type=T cell (several "
                        'values separated by commas; a value holding a comma in double quotes: "CD4+, naive")')
    try:
        fields = next(csv.reader([values], skipinitialspace=True, strict=True), [""])
    except csv.Error as error:
        raise DataError(f"{flag} {item!r}: {error}; expected values separated by commas, a value holding a comma "
                        'in double quotes, e.g. cell_type="CD4+, naive",B cell') from None
    return column.strip(), [value.strip() for value in fields]


def format_column_values(column: str, values: Iterable[str]) -> str:
    """The filter text :func:`parse_column_values` reads back as ``(column, values)``: values
    holding a comma or a double quote are quoted."""
    buffer = io.StringIO()
    csv.writer(buffer, lineterminator="").writerow([str(value) for value in values])
    return f"{column}={buffer.getvalue()}"
