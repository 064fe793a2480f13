"""LoRA on the attention projections, through ``loralib``.

``LoRALinear`` subclasses ``loralib.Linear`` (itself an ``nn.Linear``), so
``attention.self.query.weight`` keeps its name and Geneformer checkpoints load unchanged.
loralib merges ``B @ A`` into ``weight`` on ``eval()`` when ``merge_weights`` is on; a state
dict taken then would hold the update twice once reloaded. Here the state dict always
holds the unmerged weight, whatever the mode, and loading into a merged layer unmerges it
first.

Config keys: ``lora_r``, ``lora_alpha``, ``lora_dropout``, ``lora_target_modules`` (shared
with ``dora``) and ``lora_merge_weights`` (``docs/peft_keys.md`` §3.1).
"""
from __future__ import annotations

import re
from typing import Any

import loralib
import torch
import torch.nn.functional as F
from torch import nn

from .base import PeftMethod, config_error, linear_paths, names_own_linears

LORA_KEYS = ("lora_A", "lora_B")
#: the projections ``lora_target_modules`` may name (``encoder.layer.N.attention.self.<name>``)
LORA_TARGETS = ("query", "key", "value")
#: keys of the low-rank update, read by ``lora`` and ``dora`` alike
LORA_RANK_KEYS: dict[str, Any] = {
    "lora_r": 8,
    "lora_alpha": 1,
    "lora_dropout": 0.0,
    "lora_target_modules": ["query", "value"],
}
# The scPEFT reference named the projections lora_query / lora_key / lora_value.
_REFERENCE_NAME = re.compile(r"(\.attention\.self\.)lora_(query|key|value)\.")


class LoRALinear(loralib.Linear):
    """``y = x W^T + b + (alpha / r) * dropout(x) A^T B^T`` with ``B = 0`` at start."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged or self.r == 0 or self.fan_in_fan_out:
            return super().forward(x)
        result = F.linear(x, self.weight, self.bias)
        low = F.linear(self.lora_dropout(x), self.lora_A)
        # The rank-r product is accumulated into the base output in place by one addmm
        # (loralib and peft materialise it, scale it, then add: two more passes over a
        # batch x length x out tensor; 30% of this layer's time at 4 x 1,024 x 256). The
        # base output is not needed by any backward, so the in-place update is autograd-safe.
        flat = result.view(-1, self.out_features)
        flat.addmm_(low.reshape(-1, self.r).to(flat.dtype), self.lora_B.t().to(flat.dtype), alpha=self.scaling)
        return result

    def delta_weight(self) -> torch.Tensor:
        return (self.lora_B @ self.lora_A) * self.scaling

    def reset_peft_parameters(self) -> None:
        nn.init.kaiming_uniform_(self.lora_A, a=5 ** 0.5)
        nn.init.zeros_(self.lora_B)

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if self.merged:
            destination[prefix + "weight"] = (self.weight - self.delta_weight()).detach()

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        if self.merged:
            with torch.no_grad():
                self.weight -= self.delta_weight()
            self.merged = False
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


def lora_linear(base: nn.Linear, config: Any) -> LoRALinear:
    """A LoRA layer of the same shape as ``base`` carrying the config's settings."""
    layer = LoRALinear(
        base.in_features,
        base.out_features,
        bias=base.bias is not None,
        r=config.lora_r,
        lora_alpha=config.lora_alpha,
        lora_dropout=float(config.lora_dropout),
        merge_weights=bool(config.lora_merge_weights),
    )
    return layer


def _build_linear(config: Any, path: str, base: nn.Linear) -> LoRALinear:
    return lora_linear(base, config)


def check_lora_r_type(config: Any, source: str | None) -> None:
    """``lora_r`` is an integer even when no low-rank method is on (the scPEFT files say so)."""
    if not isinstance(config.lora_r, int) or isinstance(config.lora_r, bool):
        raise config_error("lora_r", config.lora_r, "an integer", source)


def check_rank_keys(config: Any, source: str | None, method: str = "lora") -> None:
    """Check ``lora_r``, ``lora_target_modules``, ``lora_dropout`` and ``lora_alpha`` for ``method``."""
    if config.lora_r <= 0:
        raise config_error("lora_r", config.lora_r, f"an integer >= 1 when prompt_type includes '{method}'", source)
    targets = config.lora_target_modules
    allowed = linear_paths(config) if names_own_linears(config) else LORA_TARGETS
    if isinstance(targets, str) or not targets or any(t not in allowed for t in targets):
        raise config_error("lora_target_modules", targets, f"a non-empty list from {list(allowed)}", source)
    if not (0.0 <= float(config.lora_dropout) < 1.0):
        raise config_error("lora_dropout", config.lora_dropout, "a number in [0, 1)", source)
    if float(config.lora_alpha) <= 0:
        raise config_error("lora_alpha", config.lora_alpha, "a positive number", source)


def rank_targets(config: Any) -> frozenset[str]:
    """The projection paths ``lora_target_modules`` names (a family naming its own projections
    lists their paths; BERT's names are ``attention.self.<name>``)."""
    if names_own_linears(config):
        return frozenset(config.lora_target_modules)
    return frozenset(f"attention.self.{name}" for name in config.lora_target_modules)


def map_reference_lora_key(key: str) -> str:
    """``...attention.self.lora_query.X`` (reference) -> ``...attention.self.query.X``."""
    return _REFERENCE_NAME.sub(r"\1\2.", key)


@torch.no_grad()
def merge_into(model: nn.Module, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``state`` (the model's state dict) with every LoRA update folded into its base weight
    and the ``lora_A`` / ``lora_B`` entries removed."""
    for name, module in model.named_modules():
        if isinstance(module, LoRALinear):
            state[f"{name}.weight"] = state[f"{name}.weight"] + module.delta_weight()
            for key in LORA_KEYS:
                state.pop(f"{name}.{key}", None)
    return state


def merged_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's state dict with every LoRA update folded into its base weight and the
    ``lora_A`` / ``lora_B`` entries removed: a plain BERT state dict (LoRA alone)."""
    return merge_into(model, model.state_dict())


METHOD = PeftMethod(
    name="lora",
    config_keys={**LORA_RANK_KEYS, "lora_merge_weights": False},
    trainable_fragments=LORA_KEYS,
    resolve=check_lora_r_type,
    validate=check_rank_keys,
    linear_targets=rank_targets,
    build_linear=_build_linear,
    merge_state_dict=merge_into,
    map_checkpoint_key=map_reference_lora_key,
)
