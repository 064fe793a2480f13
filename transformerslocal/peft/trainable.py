"""What trains: one function computes the trainable set from the config.

The trainable set is the UNION over the methods in ``prompt_type`` plus the task head
(``bert.pooler`` and ``classifier``, or the MLM head). The scPEFT reference froze in one
loop per method, each freezing all but its own keyword, so only the last listed method
trained, and it left the randomly initialised pooler frozen; both are fixed here.
Full fine-tuning (``prompt_type`` empty) trains everything; with ``freeze_layers`` N > 0
the embeddings and the first N layers stay frozen (Geneformer's Classifier option); a config
of another model family (scBERT's ``PerformerConfig``) says itself what full fine-tuning
freezes (``frozen_in_full_finetuning``, with its ``freeze_preset``).
Which method owns a parameter is the registry's answer (each method's
``trainable_fragments``; ``docs/peft_keys.md`` §4).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

from torch import nn

from .registry import METHOD_KEYS, owner_of

logger = logging.getLogger(__name__)

__all__ = ["METHOD_KEYS", "ParameterReport", "is_trainable", "mark_trainable", "parameter_report",
           "trainable_parameter_names"]

_DEFAULT_HEAD = ("bert.pooler.", "classifier.", "cls.")


def _head_prefixes(model: nn.Module) -> tuple[str, ...]:
    return getattr(model, "head_prefixes", None) or _DEFAULT_HEAD


def _frozen_by_freeze_layers(name: str, freeze_layers: int) -> bool:
    if freeze_layers <= 0:
        return False
    if name.startswith(("bert.embeddings.", "embeddings.")):
        return True
    for i in range(freeze_layers):
        if f"encoder.layer.{i}." in name:
            return True
    return False


def is_trainable(name: str, config, head_prefixes: tuple[str, ...] = _DEFAULT_HEAD) -> bool:
    """Whether the parameter called ``name`` trains under ``config``."""
    methods = config.peft_methods
    if not methods:
        family_rule = getattr(config, "frozen_in_full_finetuning", None)  # another model family's layout
        if family_rule is not None:
            return not family_rule(name)
        return not _frozen_by_freeze_layers(name, config.freeze_layers)
    if name.startswith(head_prefixes):
        return True
    return owner_of(name, methods) is not None


def trainable_parameter_names(model: nn.Module, config=None) -> list[str]:
    """Names of the parameters that train under ``config`` (default: the model's)."""
    config = config if config is not None else model.config
    heads = _head_prefixes(model)
    return [n for n, _ in model.named_parameters() if is_trainable(n, config, heads)]


@dataclass(frozen=True)
class ParameterReport:
    trainable: int
    total: int

    @property
    def percent(self) -> float:
        return 100.0 * self.trainable / self.total if self.total else 0.0

    def __str__(self) -> str:
        return f"trainable parameters: {self.trainable:,} of {self.total:,} ({self.percent:.4f}%)"

    def to_dict(self) -> dict:
        return {"trainable_parameters": self.trainable, "total_parameters": self.total,
                "trainable_percent": self.percent}


def parameter_report(model: nn.Module) -> ParameterReport:
    """Trainable and total parameter counts (tied weights counted once)."""
    params = list(model.parameters())  # .parameters() yields a shared tensor once
    return ParameterReport(trainable=sum(p.numel() for p in params if p.requires_grad),
                           total=sum(p.numel() for p in params))


def mark_trainable(model: nn.Module, config=None) -> ParameterReport:
    """Set ``requires_grad`` from the config (the union of the methods plus the head) and
    log the trainable / total parameter counts."""
    names = set(trainable_parameter_names(model, config))
    for name, param in model.named_parameters():
        param.requires_grad_(name in names)
    report = parameter_report(model)
    cfg = config if config is not None else model.config
    logger.info("prompt_type=%r: %s", cfg.prompt_type if cfg.peft_methods else "", report)
    return report
