"""What made a fold's results: settings, data and checkpoint, recorded in ``provenance.json``.

Every fold folder of a fine-tuning run holds ``provenance.json``::

    {"fold": 0,
     "settings": {"options": {...every RunOptions field that changes results...},
                  "training": {...every TrainingArguments field that changes results...},
                  "fold_seed": 0, "config": {...the fold's resolved config.json...},
                  "checkpoint": {"path": ..., "files": {"model.safetensors": {"size", "sha256"}, ...}},
                  "token_dictionary": {"path", "size", "sha256"} | null,
                  "data": {"train": {"path", "size_bytes", "n_cells", "label_column", "label_sha256"}, ...}},
     "environment": {"versions": {...}, "device": "cpu", "host": ...},
     "recorded_at": "..."}

The settings are derived from the option dataclasses field by field (:func:`option_settings`),
so a field added to ``RunOptions`` or ``TrainingArguments`` is recorded and compared without
touching this module. Only the fields in :data:`NOT_RESULT_FIELDS` are left out: they say where
outputs go, which folds to run, or how a run is shown, not what a fold computes.

A rerun into the same folder compares the recorded ``settings`` with the new ones
(:func:`compare_settings`): identical settings skip the fold, different ones are refused
(:class:`SettingsChanged`) with every differing key and both values. ``environment`` is
recorded but not compared (a library upgrade does not invalidate finished folds).

File hashes (SHA-256) are cached by path, size and modification time in
``<run_dir>/.cache/file_hashes.json``, so a rerun does not read a large checkpoint again.
"""
from __future__ import annotations

import dataclasses
import datetime as _dt
import hashlib
import json
import logging
import os
import socket
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from geneformer_peft.errors import DataError
from geneformer_peft.fingerprints import (  # noqa: F401 - part of this module's interface
    HASH_CHUNK,
    PROVENANCE_FILE,
    FileHashCache,
    checkpoint_fingerprint,
    read_provenance,
)

logger = logging.getLogger(__name__)

__all__ = [
    "NOT_RESULT_FIELDS",
    "PROVENANCE_FILE",
    "FileHashCache",
    "SettingsChanged",
    "checkpoint_fingerprint",
    "compare_settings",
    "data_fingerprint",
    "differing_keys_message",
    "fold_provenance",
    "jsonable",
    "option_settings",
    "read_provenance",
    "summary_settings",
]

#: option fields that do not change what a fold computes (location, fold selection, display,
#: data-loading processes, CPU threads), so a rerun may change them freely
NOT_RESULT_FIELDS = frozenset({"output_path", "out_prefix", "folds", "overwrite", "progress", "num_workers",
                               "num_threads"})
#: keys of ``settings`` that belong to one fold and differ between folds by design
PER_FOLD_KEYS = ("data", "fold_seed")


class SettingsChanged(DataError):
    """A rerun or resume with other settings than those that made the existing outputs (exit code 2)."""


def jsonable(value: Any) -> Any:
    """``value`` as JSON types: paths absolute strings, dataclasses and mappings dicts, tuples lists."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: jsonable(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, os.PathLike):
        return str(Path(value).expanduser().resolve())
    if isinstance(value, Mapping):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        items = [jsonable(v) for v in value]
        return sorted(items, key=repr) if isinstance(value, (set, frozenset)) else items
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if hasattr(value, "item"):  # numpy scalar
        return value.item()
    return repr(value)


def option_settings(options: Any) -> dict[str, Any]:
    """Every field of a dataclass of options except :data:`NOT_RESULT_FIELDS`, nested
    dataclasses as their own dicts (their fields filtered the same way)."""
    out: dict[str, Any] = {}
    for f in dataclasses.fields(options):
        if f.name in NOT_RESULT_FIELDS:
            continue
        value = getattr(options, f.name)
        out[f.name] = option_settings(value) if dataclasses.is_dataclass(value) else jsonable(value)
    return out


def _directory_size(path: Path) -> int:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


def data_fingerprint(paths: Mapping[str, Path], datasets: Mapping[str, Any],
                     label_column: str | list[str]) -> dict[str, Any]:
    """Per split: the dataset's path, bytes on disk, cell count and a SHA-256 of its label column
    (of a multi-task run's label columns, one after the other)."""
    out = {}
    for split, path in paths.items():
        dataset = datasets[split]
        columns = [label_column] if isinstance(label_column, str) else list(label_column)
        labels = [v for c in columns if c in dataset.column_names for v in dataset[c]]
        digest = hashlib.sha256("\n".join(map(str, labels)).encode("utf-8")).hexdigest()
        out[split] = {"path": str(Path(path).resolve()), "size_bytes": _directory_size(Path(path)),
                      "n_cells": len(dataset), "label_column": label_column, "label_sha256": digest}
    return out


def fold_provenance(options: Any, fold: int, *, config: Mapping[str, Any], data: Mapping[str, Any],
                    checkpoint: Mapping[str, Any], token_dictionary: Mapping[str, Any] | None,
                    environment: Mapping[str, Any]) -> dict[str, Any]:
    """The provenance record of one fold (see the module docstring).

    ``options`` is the run's ``RunOptions``; its ``training`` dataclass is recorded under
    ``settings.training`` and the seed the fold trains with under ``settings.fold_seed``.
    """
    settings = option_settings(options)
    training = settings.pop("training", {})
    record_settings = {"options": settings, "training": training,
                       "fold_seed": int(training.get("seed", 0)) + int(fold), "config": jsonable(dict(config)),
                       "checkpoint": jsonable(dict(checkpoint)),
                       "token_dictionary": jsonable(dict(token_dictionary)) if token_dictionary else None,
                       "data": jsonable(dict(data))}
    return {"fold": int(fold), "settings": json.loads(json.dumps(record_settings)),
            "environment": jsonable({**environment, "host": socket.gethostname()}),
            "recorded_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")}


def _flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(value, dict) and value:
        out: dict[str, Any] = {}
        for key, item in value.items():
            out.update(_flatten(item, f"{prefix}.{key}" if prefix else str(key)))
        return out
    return {prefix: value}


_MISSING = "<not recorded>"


def compare_settings(recorded: Mapping[str, Any], current: Mapping[str, Any]) -> list[tuple[str, Any, Any]]:
    """``(key, recorded value, current value)`` for every dotted key whose value differs. A key
    one side lacks and the other holds as ``None`` does not differ: an option added since the
    record was written, left unset (e.g. ``task_weights``), changes nothing."""
    old, new = _flatten(json.loads(json.dumps(recorded))), _flatten(json.loads(json.dumps(current)))
    diffs = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key, _MISSING), new.get(key, _MISSING)
        unset = (a is None and isinstance(b, str) and b == _MISSING) or (b is None and isinstance(a, str)
                                                                            and a == _MISSING)
        if a != b and not unset:
            diffs.append((key, a, b))
    return diffs


def _short(value: Any, limit: int = 240) -> str:
    text = json.dumps(value) if not isinstance(value, str) or value == _MISSING else repr(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."


def differing_keys_message(diffs: list[tuple[str, Any, Any]], *, limit: int = 20) -> str:
    """``key: recorded -> now`` lines (at most ``limit``, then a count)."""
    lines = [f"    {key}: {_short(old)} (recorded) -> {_short(new)} (now)" for key, old, new in diffs[:limit]]
    if len(diffs) > limit:
        lines.append(f"    ... and {len(diffs) - limit} more")
    return "\n".join(lines)


def summary_settings(records: Mapping[Any, dict | None]) -> dict[str, Any]:
    """The summary's view of the folds' own recorded settings.

    Returns
    -------
    dict
        ``settings`` (the keys every fold with a record agrees on, nested as recorded, without
        the per-fold data and seed), ``settings_differ_between_folds`` (dotted key -> {fold:
        value}), ``fold_data`` ({fold: data fingerprint and seed}) and
        ``folds_without_provenance``.
    """
    present = {fold: r["settings"] for fold, r in records.items() if r}
    missing = [fold for fold, r in records.items() if not r]
    flat = {fold: _flatten({k: v for k, v in s.items() if k not in PER_FOLD_KEYS}) for fold, s in present.items()}
    keys = sorted(set().union(*flat.values())) if flat else []
    common: dict[str, Any] = {}
    differ: dict[str, dict[str, Any]] = {}
    for key in keys:
        values = {str(fold): f.get(key, _MISSING) for fold, f in flat.items()}
        if len({json.dumps(v, sort_keys=True) for v in values.values()}) == 1:
            common[key] = next(iter(values.values()))
        else:
            differ[key] = values
    nested: dict[str, Any] = {}
    for key, value in common.items():
        node, parts = nested, key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):  # a name with a dot in it: keep the dotted key
                nested[key], node = value, None
                break
        if node is not None:
            node[parts[-1]] = value
    return {"settings": nested, "settings_differ_between_folds": differ,
            "fold_data": {str(fold): {k: s.get(k) for k in PER_FOLD_KEYS} for fold, s in present.items()},
            "folds_without_provenance": missing}
