"""Optimiser and learning-rate schedule of fine-tuning and pretraining."""
from __future__ import annotations

import math

import torch
from torch import nn

__all__ = ["make_optimizer", "make_scheduler"]


def make_optimizer(model: nn.Module, *, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    """AdamW over the trainable parameters; no weight decay on biases and LayerNorms.

    Parameters
    ----------
    model
        The model; parameters with ``requires_grad=False`` are left out.
    lr
        Peak learning rate.
    weight_decay
        Decoupled weight decay of the matrices.

    Returns
    -------
    torch.optim.AdamW
        Two parameter groups: decayed and not decayed.
    """
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        (no_decay if param.ndim < 2 or "LayerNorm" in name else decay).append(param)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr)


def make_scheduler(optimizer: torch.optim.Optimizer, total_steps: int, *, warmup_steps: int = 0,
                   warmup_ratio: float = 0.0, schedule: str = "linear") -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warmup, then linear decay to zero, cosine decay, or a constant rate.

    Parameters
    ----------
    optimizer
        The optimiser whose groups' rates are scaled.
    total_steps
        Optimiser steps of the whole run.
    warmup_steps
        Warmup steps; when 0, ``warmup_ratio`` of all steps (rounded up).
    warmup_ratio
        Fraction of the steps spent warming up when ``warmup_steps`` is 0.
    schedule
        ``"linear"``, ``"cosine"`` or ``"constant"`` after warmup.

    Returns
    -------
    torch.optim.lr_scheduler.LambdaLR
        Step it once per optimiser step.
    """
    warmup = warmup_steps or int(math.ceil(warmup_ratio * total_steps))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        if schedule == "constant":
            return 1.0
        progress = (step - warmup) / max(1, total_steps - warmup)
        if schedule == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
        return max(0.0, 1.0 - progress)

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
