"""LoRA on the attention projections, through ``loralib``.

``LoRALinear`` subclasses ``loralib.Linear`` (itself an ``nn.Linear``), so
``attention.self.query.weight`` keeps its name and Geneformer checkpoints load unchanged.
loralib merges ``B @ A`` into ``weight`` on ``eval()`` when ``merge_weights`` is on; a state
dict taken then would hold the update twice once reloaded. Here the state dict always
holds the unmerged weight, whatever the mode, and loading into a merged layer unmerges it
first.
"""
from __future__ import annotations

import re

import loralib
import torch
from torch import nn

LORA_KEYS = ("lora_A", "lora_B")
# The scPEFT reference named the projections lora_query / lora_key / lora_value.
_REFERENCE_NAME = re.compile(r"(\.attention\.self\.)lora_(query|key|value)\.")


class LoRALinear(loralib.Linear):
    """``y = x W^T + b + (alpha / r) * dropout(x) A^T B^T`` with ``B = 0`` at start."""

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


def lora_linear(base: nn.Linear, config) -> LoRALinear:
    """A LoRA layer of the same shape as ``base`` carrying the config's settings."""
    layer = LoRALinear(
        base.in_features,
        base.out_features,
        r=config.lora_r,
        lora_alpha=config.lora_alpha,
        lora_dropout=float(config.lora_dropout),
        merge_weights=bool(config.lora_merge_weights),
    )
    return layer


def map_reference_lora_key(key: str) -> str:
    """``...attention.self.lora_query.X`` (reference) -> ``...attention.self.query.X``."""
    return _REFERENCE_NAME.sub(r"\1\2.", key)


@torch.no_grad()
def merged_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's state dict with every LoRA update folded into its base weight and the
    ``lora_A`` / ``lora_B`` entries removed: a plain BERT state dict."""
    state = model.state_dict()
    for name, module in model.named_modules():
        if isinstance(module, LoRALinear):
            state[f"{name}.weight"] = state[f"{name}.weight"] + module.delta_weight()
            for key in LORA_KEYS:
                state.pop(f"{name}.{key}", None)
    return state
