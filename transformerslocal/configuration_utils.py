"""What every model family's config shares: the classifier's labels, the ``config.json`` round
trip and the checkpoint-folder format.

A family's config class (:class:`~.configuration_bert.BertConfig`,
:class:`~.configuration_performer.PerformerConfig`) subclasses :class:`ConfigBase` and brings
its own keys, ``validate`` and ``to_dict``; it may refine ``_merge_overrides`` (how overrides
combine with a file's keys) and ``_check_file_data`` (what a ``config.json`` must hold).
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from .peft.base import config_error
from .peft.registry import PEFT_METHODS

__all__ = ["CONFIG_NAME", "ConfigBase", "merge_label_overrides", "parse_prompt_type"]

CONFIG_NAME = "config.json"


def merge_label_overrides(data: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """``data`` with ``overrides`` applied; ``num_labels`` alone replaces the label maps when it
    differs from their size, and keeps the label names when it equals it (as HF)."""
    merged = {**data, **overrides}
    if "num_labels" in overrides and "id2label" not in overrides:
        current = data.get("id2label")
        if current is None or len(current) != int(overrides["num_labels"]):
            merged.pop("id2label", None)
            merged.pop("label2id", None)
    return merged


def parse_prompt_type(prompt_type: Any, *, source: str | None = None) -> tuple[str, ...]:
    """Split a comma-separated ``prompt_type`` into method names, checking each one."""
    if prompt_type is None:
        return ()
    if isinstance(prompt_type, (list, tuple)):
        parts = [str(p).strip() for p in prompt_type]
    elif isinstance(prompt_type, str):
        parts = [p.strip() for p in prompt_type.split(",")]
    else:
        raise config_error("prompt_type", prompt_type, "a comma-separated string of methods", source)
    methods: list[str] = []
    for part in parts:
        if not part:
            continue
        if part not in PEFT_METHODS:
            raise config_error("prompt_type", prompt_type,
                       f"comma-separated names from {list(PEFT_METHODS)} (unknown method {part!r}); "
                       "'' means full fine-tuning", source)
        if part not in methods:
            methods.append(part)
    return tuple(methods)


class ConfigBase:
    """Labels, JSON and folder I/O of a model config (see the module docstring)."""

    _source: str | None
    prompt_type: str
    if_use_prompt: bool
    id2label: dict[int, str]
    label2id: dict[str, int]

    # ------------------------------------------------------------------ other keys
    def _keep_extra_keys(self, extra: dict[str, Any]) -> None:
        """Keep keys the config does not know (written back verbatim); a key that names a value
        derived from the others (a read-only property such as ``head_dim``) is refused, naming it."""
        for key, value in extra.items():
            if isinstance(getattr(type(self), key, None), property):
                raise config_error(key, value, f"no such key in a {getattr(self, 'model_type', 'model')} config "
                                   f"({key} is derived from the other keys; leave it out)", self._source)
        self._extra_keys = list(extra)
        for key, value in extra.items():
            setattr(self, key, value)

    # ------------------------------------------------------------------ freezing
    def _check_freeze_preset(self, presets: tuple[str, ...], methods, *, requires: tuple[tuple[bool, str], ...] = ()
                             ) -> None:
        """``freeze_preset`` is null or one of ``presets``, then each ``(holds, expected)`` of
        ``requires`` holds, and the preset is the only way of freezing and a full fine-tuning
        recipe (no ``freeze_layers``, no PEFT method)."""
        preset = getattr(self, "freeze_preset", None)
        if preset is None:
            return
        src = self._source
        if preset not in presets:
            raise config_error("freeze_preset", preset, f"null or one of {list(presets)}", src)
        for holds, expected in requires:
            if not holds:
                raise config_error("freeze_preset", preset, expected, src)
        if self.freeze_layers:
            raise config_error("freeze_preset", preset, f"null when freeze_layers is set ({self.freeze_layers}); "
                               "choose one way of freezing", src)
        if methods and self.if_use_prompt:
            raise config_error("freeze_preset", preset, f"null when prompt_type lists PEFT methods "
                               f"({self.prompt_type!r}); the preset is a full fine-tuning recipe", src)

    # ------------------------------------------------------------------ labels
    def _set_labels(self, id2label, label2id, num_labels) -> None:
        if id2label is not None:
            id2label = {int(k): str(v) for k, v in dict(id2label).items()}
            if num_labels is not None and int(num_labels) != len(id2label):
                raise config_error("num_labels", num_labels, f"{len(id2label)} (the size of id2label)", self._source)
        else:
            n = 2 if num_labels is None else int(num_labels)
            if n < 1:
                raise config_error("num_labels", num_labels, "an integer >= 1", self._source)
            id2label = {i: f"LABEL_{i}" for i in range(n)}
        self.id2label = id2label
        self.label2id = {str(k): int(v) for k, v in dict(label2id).items()} if label2id else {
            v: k for k, v in id2label.items()}

    def _label_dict(self) -> dict[str, Any]:
        """The label maps as ``config.json`` holds them (string keys)."""
        return {"id2label": {str(k): v for k, v in self.id2label.items()}, "label2id": dict(self.label2id)}

    @property
    def num_labels(self) -> int:
        return len(self.id2label)

    @num_labels.setter
    def num_labels(self, n: int) -> None:
        if int(n) != len(self.id2label):  # as HF: the same number keeps the label names
            self._set_labels(None, None, n)

    # ------------------------------------------------------------------ PEFT
    @property
    def peft_methods(self) -> tuple[str, ...]:
        """Active PEFT methods in the order listed; empty for full fine-tuning."""
        if not self.if_use_prompt:
            return ()
        return parse_prompt_type(self.prompt_type, source=self._source)

    def uses(self, method: str) -> bool:
        """Whether ``method`` (a name of the PEFT registry) is switched on."""
        return method in self.peft_methods

    # ------------------------------------------------------------------ io
    def to_dict(self) -> dict[str, Any]:
        raise NotImplementedError

    def to_json_string(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"

    @staticmethod
    def _merge_overrides(data: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
        return merge_label_overrides(data, overrides)

    @classmethod
    def _check_file_data(cls, path: Path, data: dict[str, Any]) -> None:
        """Raise ``ValueError`` when a ``config.json``'s keys belong to another family."""

    @classmethod
    def from_dict(cls, config_dict: dict[str, Any], **overrides: Any):
        """Build from a dict (as read from ``config.json``); ``overrides`` win."""
        return cls(**cls._merge_overrides(config_dict, overrides))

    @classmethod
    def from_json_file(cls, path: str | os.PathLike, **overrides: Any):
        path = Path(path)
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as err:
            raise ValueError(f"{path} is not valid JSON: {err}") from err
        if not isinstance(data, dict):
            raise ValueError(f"{path} holds a {type(data).__name__}; expected a JSON object of config keys")
        cls._check_file_data(path, data)
        return cls(**cls._merge_overrides(data, overrides), _source=str(path))

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, **overrides: Any):
        """Read ``config.json`` from a checkpoint folder, or a JSON file given directly."""
        path = Path(path)
        file = path / CONFIG_NAME if path.is_dir() else path
        if not file.is_file():
            raise FileNotFoundError(f"no config found: looked for {file}")
        return cls.from_json_file(file, **overrides)

    def save_pretrained(self, directory: str | os.PathLike) -> Path:
        """Write ``config.json`` into ``directory`` (atomically: a reader never sees half a file)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        file = directory / CONFIG_NAME
        tmp = file.with_suffix(".json.tmp")
        tmp.write_text(self.to_json_string(), encoding="utf-8")
        os.replace(tmp, file)
        return file

    def copy(self, **overrides: Any):
        return type(self).from_dict(self.to_dict(), **overrides)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, type(self)) and self.to_dict() == other.to_dict()

    def __repr__(self) -> str:
        return f"{type(self).__name__} {self.to_json_string()}"
