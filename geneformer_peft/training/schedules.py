"""Optimiser and learning-rate schedule of fine-tuning and pretraining.

Layer-wise learning-rate decay (``layer_decay=D``, the MindSpore Geneformer recipe): with
``N`` encoder layers, the head (pooler, classifier and anything else outside the encoder)
trains at the peak rate ``lr``, encoder layer ``i`` (0-based from the bottom) at
``lr * D**(N - i)`` (the top layer at ``lr * D``), and the embeddings at ``lr * D**(N + 1)``.
A PEFT parameter takes the rate of the layer it sits in (``bert.encoder.layer.<i>.`` in its
name: LoRA/DoRA/IA3 factors, adapters, prefix prompts); the gene-token adapter on the
embedding output (``bert.adapter.``) takes the embeddings' rate, since it acts on the
embedding output, below layer 0. scBERT's layers are ``performer.net.layers.<i>.`` and its
embeddings ``token_emb`` (and ``adapter.``); its final ``norm`` and ``to_out`` head train at
``lr``. CellFM's layers are ``encoder.<i>.`` and its embeddings ``gene_emb``, ``cls_token``
and the value encoder. Biases, LayerNorm weights and other 1-d parameters get no weight decay.

The schedule (``make_scheduler``) scales every group's rate by one factor, so the ratio
between layers holds at every step; with ``lr_end=E`` the linear and cosine schedules end
at ``E`` for the peak-rate groups (and at ``E`` times the layer's decay factor for the
others) instead of 0, as MindSpore's ``LinearWithWarmUpLR`` does.
"""
from __future__ import annotations

import logging
import math
import re

import torch
from torch import nn

logger = logging.getLogger(__name__)

__all__ = ["layer_index", "make_optimizer", "make_scheduler", "parameter_groups", "schedule_factor"]

#: the BERT's layers (``bert.encoder.layer.<i>.``) and scBERT's (``performer.net.layers.<i>.``)
_LAYER = re.compile(r"(?:^|\.)(?:encoder\.layer|net\.layers)\.(\d+)\.")
#: CellFM's layers (``encoder.<i>.``) and embeddings (gene, cls token, value encoder)
_CELLFM_LAYER = re.compile(r"^encoder\.(\d+)\.")
_CELLFM_EMBEDDINGS = ("gene_emb", "cls_token", "value_enc.")
#: scBERT's gene embedding (its gene2vec positions are a buffer, not trained)
_PERFORMER_EMBEDDINGS = ("token_emb.",)


def _num_layers(model: nn.Module, names: list[str]) -> int:
    config = getattr(model, "config", None)
    n = getattr(config, "num_hidden_layers", None)
    if isinstance(n, int) and n > 0:
        return n
    found = [int(m.group(1)) for name in names if (m := _LAYER.search(name))]
    return max(found) + 1 if found else 0


def layer_index(name: str, num_layers: int) -> int:
    """Depth of a parameter for layer-wise decay: 0 embeddings (and the embedding-output
    adapter), ``i + 1`` encoder layer ``i``, ``num_layers + 1`` the head and everything else.

    Parameters
    ----------
    name
        Parameter name as in ``model.named_parameters()``.
    num_layers
        Encoder layers of the model.
    """
    match = _LAYER.search(name) or _CELLFM_LAYER.search(name)
    if match:
        return int(match.group(1)) + 1
    if "embeddings." in name or name.startswith(("bert.adapter.", "adapter.") + _CELLFM_EMBEDDINGS + _PERFORMER_EMBEDDINGS):
        return 0
    return num_layers + 1


def _no_decay(name: str, param: torch.Tensor) -> bool:
    return param.ndim < 2 or "LayerNorm" in name


def _depth_name(depth: int, num_layers: int) -> str:
    if depth == 0:
        return "embeddings"
    if depth > num_layers:
        return "head"
    return f"layer {depth - 1}"


def parameter_groups(model: nn.Module, *, lr: float, weight_decay: float,
                     layer_decay: float | None = None) -> list[dict]:
    """AdamW parameter groups of the trainable parameters.

    Parameters
    ----------
    model
        The model; parameters with ``requires_grad=False`` are left out.
    lr
        Peak learning rate.
    weight_decay
        Decoupled weight decay of the matrices (none on biases, LayerNorms, other 1-d tensors).
    layer_decay
        ``None``: two groups (decayed, not decayed) at ``lr``. A number ``D`` in (0, 1]: one
        group per depth and decay kind at ``lr * D**(N + 1 - depth)`` (see the module docstring).

    Returns
    -------
    list of dict
        Each with ``params``, ``lr``, ``weight_decay``, ``name`` and ``lr_scale`` (its rate / ``lr``);
        with layer decay, only groups that hold parameters.
    """
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if layer_decay is None:
        groups = [
            {"name": "decay", "params": [p for n, p in named if not _no_decay(n, p)], "weight_decay": weight_decay,
             "lr": lr, "lr_scale": 1.0},
            {"name": "no_decay", "params": [p for n, p in named if _no_decay(n, p)], "weight_decay": 0.0,
             "lr": lr, "lr_scale": 1.0},
        ]
        return groups  # both kept even when one is empty: resume checkpoints expect two groups
    if not 0 < layer_decay <= 1:
        raise ValueError(f"layer_decay={layer_decay!r} is not valid; expected a number in (0, 1], e.g. 0.65")
    num_layers = _num_layers(model, [n for n, _ in named])
    by_key: dict[tuple[int, bool], dict] = {}
    for name, param in named:
        depth = layer_index(name, num_layers)
        skip = _no_decay(name, param)
        key = (depth, skip)
        if key not in by_key:
            scale = float(layer_decay) ** (num_layers + 1 - depth)
            by_key[key] = {"name": f"{_depth_name(depth, num_layers)} ({'no_decay' if skip else 'decay'})",
                           "params": [], "weight_decay": 0.0 if skip else weight_decay,
                           "lr": lr * scale, "lr_scale": scale}
        by_key[key]["params"].append(param)
    return [by_key[k] for k in sorted(by_key)]


def make_optimizer(model: nn.Module, *, lr: float, weight_decay: float,
                   layer_decay: float | None = None) -> torch.optim.Optimizer:
    """AdamW over the trainable parameters; no weight decay on biases and LayerNorms.

    Parameters
    ----------
    model
        The model; parameters with ``requires_grad=False`` are left out.
    lr
        Peak learning rate.
    weight_decay
        Decoupled weight decay of the matrices.
    layer_decay
        Layer-wise learning-rate decay factor (``None``: every group at ``lr``).

    Returns
    -------
    torch.optim.AdamW
        Without layer decay two parameter groups (decayed and not decayed); with it one per
        depth and decay kind. Each group's rate is logged at INFO.
    """
    groups = parameter_groups(model, lr=lr, weight_decay=weight_decay, layer_decay=layer_decay)
    for group in groups:
        logger.info("optimizer group %-22s lr %.6g  weight_decay %g  (%d tensors, %d parameters)", group["name"],
                    group["lr"], group["weight_decay"], len(group["params"]),
                    sum(p.numel() for p in group["params"]))
    return torch.optim.AdamW(groups, lr=lr)


def schedule_factor(step: int, total_steps: int, *, warmup: int, schedule: str = "linear",
                    end_factor: float = 0.0) -> float:
    """Multiplier of the peak rate after ``step`` optimiser steps.

    Warmup rises linearly, ``(step + 1) / (warmup + 1)``; then ``"linear"`` falls to
    ``end_factor`` at ``total_steps``, ``"cosine"`` follows half a cosine to ``end_factor``,
    ``"constant"`` stays at 1.
    """
    if step < warmup:
        return (step + 1) / (warmup + 1)
    if schedule == "constant":
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
    if schedule == "cosine":
        shape = 0.5 * (1.0 + math.cos(math.pi * progress))
    else:
        shape = max(0.0, 1.0 - progress)
    return end_factor + (1.0 - end_factor) * shape


def make_scheduler(optimizer: torch.optim.Optimizer, total_steps: int, *, warmup_steps: int = 0,
                   warmup_ratio: float = 0.0, schedule: str = "linear",
                   lr_end: float = 0.0) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warmup, then linear decay, cosine decay, or a constant rate.

    Parameters
    ----------
    optimizer
        The optimiser whose groups' rates are scaled (all by the same factor).
    total_steps
        Optimiser steps of the whole run.
    warmup_steps
        Warmup steps; when 0, ``warmup_ratio`` of all steps (rounded up).
    warmup_ratio
        Fraction of the steps spent warming up when ``warmup_steps`` is 0.
    schedule
        ``"linear"``, ``"cosine"`` or ``"constant"`` after warmup.
    lr_end
        Rate at the end of the linear and cosine schedules for a group at the peak rate (the
        head); a group at ``lr * s`` ends at ``lr_end * s``. Must be below the peak rate.

    Returns
    -------
    torch.optim.lr_scheduler.LambdaLR
        Step it once per optimiser step; after ``total_steps`` steps the head's rate is ``lr_end``.
    """
    warmup = warmup_steps or int(math.ceil(warmup_ratio * total_steps))
    peak = max((g.get("lr", 0.0) / g.get("lr_scale", 1.0) for g in optimizer.param_groups), default=0.0)
    if lr_end < 0 or (lr_end > 0 and lr_end >= peak):
        raise ValueError(f"lr_end={lr_end!r} is not valid; expected a number >= 0 below the peak rate {peak:g}")
    end_factor = lr_end / peak if peak > 0 else 0.0

    def factor(step: int) -> float:
        return schedule_factor(step, total_steps, warmup=warmup, schedule=schedule, end_factor=end_factor)

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
