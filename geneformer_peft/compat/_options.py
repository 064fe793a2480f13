"""How the compat classes accept or refuse Geneformer's arguments: one rule, one message."""
from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from geneformer_peft.errors import DataError

logger = logging.getLogger("geneformer_peft.compat")

__all__ = ["UnsupportedArgument", "filters_from", "note_unused", "refuse", "refuse_unless"]


class UnsupportedArgument(DataError):
    """A Geneformer argument (or value) this project does not support; the message names it."""


def refuse(owner: str, argument: str, value: Any, why: str) -> None:
    """Raise :class:`UnsupportedArgument` for ``owner(argument=value)``, saying why / what instead."""
    raise UnsupportedArgument(f"{owner}: {argument}={value!r} is not supported by geneformer_peft.compat; {why} "
                              "(docs/geneformer_compat.md)")


def refuse_unless(owner: str, given: Mapping[str, Any], allowed: Mapping[str, tuple[tuple, str]]) -> None:
    """Refuse every ``given[name]`` outside ``allowed[name][0]``, with ``allowed[name][1]`` as the reason."""
    for name, (values, why) in allowed.items():
        value = given.get(name, values[0])
        if not any(_same(value, v) for v in values):
            refuse(owner, name, value, why)


def _same(a: Any, b: Any) -> bool:
    if a is None or b is None or isinstance(a, bool) or isinstance(b, bool):
        return a is b
    try:
        return bool(a == b)
    except (TypeError, ValueError):
        return False


def note_unused(owner: str, argument: str, value: Any, why: str) -> None:
    """Log that an accepted argument has no effect here (never dropped silently)."""
    logger.info("%s: %s=%r has no effect here: %s", owner, argument, value, why)


def filters_from(owner: str, filter_data: Mapping[str, Any] | None) -> list[str]:
    """Geneformer's ``filter_data`` ``{column: [values]}`` as the commands' ``COLUMN=V1,V2`` filters."""
    if filter_data is None:
        return []
    if not isinstance(filter_data, Mapping):
        refuse(owner, "filter_data", filter_data, "expected a dict {column: [values]}")
    out = []
    for column, values in filter_data.items():
        values = [values] if isinstance(values, (str, int, float)) else list(values)
        if any("," in str(v) for v in values):
            refuse(owner, "filter_data", filter_data, f"a value of {column!r} contains a comma")
        out.append(f"{column}={','.join(str(v) for v in values)}")
    return out
