"""Fingerprints of files: SHA-256 hashes (cached by path, size and modification time), a
checkpoint's fingerprint, and reading the ``provenance.json`` records that hold them.

Below every stage: the fine-tuning job records fingerprints (``training.provenance``), and the
compatibility report (``checks``) compares a fold's recorded base checkpoint with the one given.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

__all__ = ["HASH_CHUNK", "PROVENANCE_FILE", "FileHashCache", "checkpoint_fingerprint", "read_provenance",
           "shared_cache"]

#: a fold (or resume) folder's record of what made it (training/provenance.py)
PROVENANCE_FILE = "provenance.json"
#: bytes read at a time while hashing
HASH_CHUNK = 1 << 20


class FileHashCache:
    """SHA-256 of files, remembered by (path, size, modification and change time, inode) in a JSON file."""

    def __init__(self, path: str | os.PathLike | None = None) -> None:
        self.path = Path(path) if path is not None else None
        self._entries: dict[str, dict] = {}
        self._dirty = False
        if self.path is not None and self.path.is_file():
            try:
                loaded = json.loads(self.path.read_text(encoding="utf-8"))
                self._entries = loaded if isinstance(loaded, dict) else {}
            except (OSError, ValueError):
                self._entries = {}

    def sha256(self, file: str | os.PathLike) -> str:
        file = Path(file).resolve()
        stat = file.stat()
        key = str(file)
        entry = self._entries.get(key)
        # size and modification time alone miss a file rewritten within one clock tick (coarse file
        # timestamps); the inode and change time catch a replaced or rewritten file
        if entry and all(entry.get(k) == v for k, v in (("size", stat.st_size), ("mtime_ns", stat.st_mtime_ns),
                                                         ("ctime_ns", stat.st_ctime_ns), ("inode", stat.st_ino))):
            return entry["sha256"]
        digest = hashlib.sha256()
        with open(file, "rb") as handle:
            for chunk in iter(lambda: handle.read(HASH_CHUNK), b""):
                digest.update(chunk)
        self._entries[key] = {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "ctime_ns": stat.st_ctime_ns,
                              "inode": stat.st_ino, "sha256": digest.hexdigest()}
        self._dirty = True
        return digest.hexdigest()

    def save(self) -> None:
        if self.path is None or not self._dirty:
            return
        from geneformer_peft.files import write_json

        write_json(self.path, self._entries)
        self._dirty = False


def _file_record(file: Path, cache: FileHashCache) -> dict[str, Any]:
    return {"size": file.stat().st_size, "sha256": cache.sha256(file)}


def checkpoint_fingerprint(model_path: str | os.PathLike, cache: FileHashCache) -> dict[str, Any]:
    """Path, sizes and SHA-256 of the checkpoint's weight file(s) and config.json."""
    from transformerslocal.modeling_utils import find_weights_file

    model_path = Path(model_path)
    weights = find_weights_file(model_path)
    files = [weights]
    if weights.name.endswith(".index.json"):
        index = json.loads(weights.read_text(encoding="utf-8"))
        files += [weights.parent / name for name in sorted(set(index.get("weight_map", {}).values()))]
    config = model_path / "config.json"
    if config.is_file():
        files.append(config)
    return {"path": str(model_path.resolve()), "files": {f.name: _file_record(f, cache) for f in files}}


def read_provenance(folder: str | os.PathLike) -> dict | None:
    """``provenance.json`` of a fold (or resume) folder, ``None`` when absent or unreadable."""
    path = Path(folder) / PROVENANCE_FILE
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as error:
        logger.warning("unreadable %s (%s)", path, error)
        return None
    return record if isinstance(record, dict) and isinstance(record.get("settings"), dict) else None


_SHARED: FileHashCache | None = None


def shared_cache() -> FileHashCache:
    """The process's in-memory hash cache: a command that fingerprints a file for its provenance
    and again for a check reads it once."""
    global _SHARED
    if _SHARED is None:
        _SHARED = FileHashCache(None)
    return _SHARED
