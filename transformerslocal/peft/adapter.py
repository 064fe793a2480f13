"""Bottleneck adapters, the building block of ``Gene_token_prompt`` (:mod:`.gene_token`) and
``encoder_prompt`` (:mod:`.encoder_adapter`).

``h -> scale * D_fc2(GELU(D_fc1(h)))`` with ``D_fc2`` zero-initialised, so a freshly built
adapter adds exactly zero and the model starts equal to the base model (Houlsby-style start;
the scPEFT reference initialised randomly). ``scale`` is 1 except for the encoder's
``MLP_Adapter`` (``mlp_adapter_scale``). Width: ``adapter_ratio * hidden_size``
(``docs/peft_keys.md`` §3.3, §3.4).
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .base import config_error

#: the config key both adapter methods read -> its default
ADAPTER_KEYS: dict[str, Any] = {"adapter_ratio": 0.25}


class Adapter(nn.Module):
    """``d -> width -> d`` bottleneck, named ``D_fc1`` / ``D_fc2`` as in the reference.

    Parameters
    ----------
    hidden_size
        ``d``.
    width
        The bottleneck width.
    scale
        A factor on the output (not a parameter, not saved); ``None`` for none.
    """

    def __init__(self, hidden_size: int, width: int, scale: float | None = None) -> None:
        super().__init__()
        self.D_fc1 = nn.Linear(hidden_size, width)
        self.act = nn.GELU()
        self.D_fc2 = nn.Linear(width, hidden_size)
        self.scale = scale

    def reset_peft_parameters(self) -> None:
        self.D_fc1.reset_parameters()
        nn.init.zeros_(self.D_fc2.weight)
        nn.init.zeros_(self.D_fc2.bias)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        out = self.D_fc2(self.act(self.D_fc1(hidden)))
        return out if self.scale is None else self.scale * out

    def extra_repr(self) -> str:
        return "" if self.scale is None else f"scale={self.scale}"


def adapter_width(config: Any) -> int:
    """``int(adapter_ratio * hidden_size)``."""
    return int(config.adapter_ratio * config.hidden_size)


def check_adapter_ratio(config: Any, source: str | None) -> None:
    """``adapter_ratio`` gives a bottleneck of width >= 1."""
    ratio = config.adapter_ratio
    width = int(ratio * config.hidden_size) if isinstance(ratio, (int, float)) else 0
    if width < 1:
        raise config_error("adapter_ratio", ratio,
                           f"a positive number with adapter_ratio * hidden_size ({config.hidden_size}) >= 1", source)


def maybe_adapter(enabled: bool, hidden_size: int, width: int, scale: float | None = None) -> Adapter | None:
    """An adapter when ``enabled``; ``None`` otherwise, so no parameter or key exists."""
    return Adapter(hidden_size, width, scale) if enabled else None
