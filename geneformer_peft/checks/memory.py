"""Will the model fit? Its parameters are counted on PyTorch's ``meta`` device (shapes only,
nothing allocated) and the memory they need is compared with what the machine has free, so
that a config asking for a huge ``hidden_size``, ``num_token`` or ``lora_r`` is refused with the
estimate instead of dying while it allocates tens of GB."""
from __future__ import annotations

import contextlib
import logging
from pathlib import Path
from typing import Any

from geneformer_peft.checks.report import OK, REFUSED, CompatibilityReport

__all__ = ["available_memory", "check_memory", "parameter_counts"]

#: bytes per parameter: fp32 weights, and for each trainable one its gradient and AdamW's two moments
WEIGHT_BYTES, TRAINING_BYTES = 4, 12


def available_memory() -> int | None:
    """Bytes of memory the machine can still give (``MemAvailable`` of /proc/meminfo), ``None`` elsewhere."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


@contextlib.contextmanager
def _quiet():
    """Model construction logs notes meant for the real model; not for this count."""
    loggers = [logging.getLogger(name) for name in ("transformerslocal", "geneformer_peft.models")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def parameter_counts(family: Any, config: Any) -> tuple[int, int] | None:
    """``(total, trainable)`` parameters of the family's classifier under ``config``, counted on the
    ``meta`` device; ``None`` when the model cannot be built there."""
    import torch

    from transformerslocal.peft.trainable import trainable_parameter_names

    try:
        with _quiet(), torch.device("meta"):
            model = family.classifier_class(config)
            trainable = set(trainable_parameter_names(model, config))
    except Exception:  # noqa: BLE001 - a model that cannot be built on meta is simply not estimated
        return None
    total = sum(p.numel() for p in model.parameters())
    return total, sum(p.numel() for name, p in model.named_parameters() if name in trainable)


def check_memory(report: CompatibilityReport, family: Any, config: Any, *, training: bool,
                 weight_shapes: dict[str, tuple[int, ...]] | None = None, available: int | None = None) -> None:
    """Refuse a model whose weights (and, when ``training``, gradients and optimizer state of its
    trainable part) need more memory than the machine has available.

    Without training, a model loaded from a weights file holds what the file holds: its tensors
    (``weight_shapes``) are counted, with no model built. Otherwise the model is built on the
    ``meta`` device (its first use in a process costs about a second of imports)."""
    import math

    if not training and weight_shapes:
        total = sum(math.prod(shape) for shape in weight_shapes.values())
        counts = (total, 0)
    else:
        counts = parameter_counts(family, config)
    available = available_memory() if available is None else available
    if counts is None:
        report.add("memory", OK, "parameter count unknown (the model cannot be built on the meta device)")
        return
    total, trainable = counts
    need = WEIGHT_BYTES * total + (TRAINING_BYTES * trainable if training else 0)
    details = {"parameters": total, "trainable_parameters": trainable, "training": training,
               "estimated_bytes": need, "available_bytes": available}
    gib = 2 ** 30
    what = (f"{total:,} parameters ({trainable:,} trainable) need about {need / gib:.2f} GiB"
            f"{' with gradients and optimizer state' if training else ''}, activations not counted")
    if available is not None and need > available:
        sizes = ", ".join(f"{k}={getattr(config, k)}" for k in ("hidden_size", "num_hidden_layers",
                                                                 "intermediate_size", "vocab_size", "num_token",
                                                                 "lora_r", "dim", "depth")
                          if getattr(config, k, None) is not None)
        report.add("memory", REFUSED, f"the model would not fit: {what}, and {available / gib:.2f} GiB are available "
                   f"({sizes}); check these config values", **details)
    else:
        report.add("memory", OK, what + (f"; {available / gib:.1f} GiB available" if available else ""), **details)
