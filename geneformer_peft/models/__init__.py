"""Models stage: the classifier built from a checkpoint and a method's ``config.json``, a
fine-tuned fold loaded back, and where and in what precision a model runs.

Names are loaded on first use (``from geneformer_peft.models import X`` imports only the
module holding ``X``).
"""
from __future__ import annotations

import importlib
from typing import Any

#: public name -> module of this package that defines it
_WHERE: dict[str, str] = {
    "autocast": "device",
    "resolve_device": "device",
    "SHAPE_KEYS": "loading",
    "check_head_labels": "loading",
    "load_classifier": "loading",
    "load_fold_model": "loading",
    "resolve_config": "loading",
    "remap_checkpoint_vocabulary": "vocabulary",
}

__all__ = sorted(_WHERE)


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_WHERE[name]}"), name)


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
