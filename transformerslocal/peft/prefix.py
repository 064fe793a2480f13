"""Prefix prompts (``prefix_prompt``): trainable tokens inserted after token 0.

The first layer enabled in ``n_layers_conf`` inserts ``num_token`` prompt vectors at
positions ``1..T`` of its input (no position embedding: prompts take no position id, so a
2048-gene input plus prompts stays legal). Each later enabled layer overwrites positions
``1..T`` with its own prompts (deep prompt tuning). After the last layer the prompt
positions are removed, so heads see gene tokens only. The attention mask is extended
inside the model.

Prompts start at N(0, initializer_range): with zeros (the reference) all T prompts are
exchangeable without positions, receive identical gradients and stay identical forever.

Config keys: ``num_token``, ``n_layers_conf`` (``docs/peft_keys.md`` §3.2).
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .base import PeftMethod, config_error, resolve_layer_list

PREFIX_KEYS = ("prompt_embeddings",)


class PromptEmbeddings(nn.Module):
    """``num_token x hidden`` prompt vectors of one encoder layer."""

    def __init__(self, num_token: int, hidden_size: int, initializer_range: float) -> None:
        super().__init__()
        self.initializer_range = initializer_range
        #: Internal, for tests: ``False`` masks the inserted prompts out as attention keys
        #: (no token attends to them), which must reproduce the model without prompts.
        #: The flag of the layer that inserts the prompts decides. Not saved, not a config key.
        self.attend = True
        self.weight = nn.Parameter(torch.empty(num_token, hidden_size))
        self.reset_peft_parameters()

    def reset_peft_parameters(self) -> None:
        nn.init.normal_(self.weight, std=self.initializer_range)

    @property
    def num_token(self) -> int:
        return self.weight.shape[0]

    def insert(self, hidden: torch.Tensor, mask: torch.Tensor | None):
        """(B, L, d) -> (B, 1+T+L-1, d): prompts after token 0; the (B, L) mask grows with
        ones (zeros when ``attend`` is off) at the prompt positions."""
        batch, seq_len = hidden.shape[:2]
        prompts = self.weight.to(hidden.dtype).unsqueeze(0).expand(batch, -1, -1)  # (B, T, d)
        hidden = torch.cat([hidden[:, :1], prompts, hidden[:, 1:]], dim=1)
        if mask is None and not self.attend:
            mask = torch.ones(batch, seq_len, dtype=torch.long, device=hidden.device)
        if mask is not None:
            fill = mask.new_full((batch, self.num_token), 1 if self.attend else 0)
            mask = torch.cat([mask[:, :1], fill, mask[:, 1:]], dim=1)
        return hidden, mask

    def overwrite(self, hidden: torch.Tensor) -> torch.Tensor:
        """Replace positions 1..T (the prompts already inserted) by this layer's prompts."""
        batch = hidden.shape[0]
        prompts = self.weight.to(hidden.dtype).unsqueeze(0).expand(batch, -1, -1)
        return torch.cat([hidden[:, :1], prompts, hidden[:, 1 + self.num_token:]], dim=1)

    def remove(self, hidden: torch.Tensor) -> torch.Tensor:
        """Drop the prompt positions this layer inserted: (B, 1+T+L-1, d) -> (B, L, d)."""
        return remove_prompts(hidden, self.num_token)


def remove_prompts(hidden: torch.Tensor, num_token: int) -> torch.Tensor:
    """Drop positions 1..T: (B, 1+T+L-1, d) -> (B, L, d)."""
    return torch.cat([hidden[:, :1], hidden[:, 1 + num_token:]], dim=1)


def _resolve(config: Any, source: str | None) -> None:
    # default: prompts at the input layer only (shallow prompt tuning)
    resolve_layer_list(config, "n_layers_conf", [1] + [0] * (config.num_hidden_layers - 1), source)


def _validate(config: Any, source: str | None) -> None:
    if not isinstance(config.num_token, int) or config.num_token < 1:
        raise config_error("num_token", config.num_token, "an integer >= 1 when prompt_type includes 'prefix_prompt'",
                           source)
    if not any(config.n_layers_conf):
        raise config_error("n_layers_conf", config.n_layers_conf,
                           "at least one 1 when prompt_type includes 'prefix_prompt'", source)


def _layer_prompt(config: Any, layer_index: int | None) -> PromptEmbeddings | None:
    if not config.n_layers_conf[layer_index]:
        return None
    return PromptEmbeddings(config.num_token, config.hidden_size, config.initializer_range)


METHOD = PeftMethod(
    name="prefix_prompt",
    config_keys={"num_token": 64, "n_layers_conf": None},
    trainable_fragments=PREFIX_KEYS,
    resolve=_resolve,
    validate=_validate,
    modules={"layer_prompt": _layer_prompt},
)
