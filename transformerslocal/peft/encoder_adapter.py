"""``encoder_prompt``: bottleneck adapters inside every encoder layer (``docs/peft_keys.md`` §3.4).

- ``attention.Space_Adapter`` where ``space_adapter_conf[i]`` is 1: on the self-attention
  output projection, before the residual LayerNorm: ``LN(a + adapter(a) + x)``,
  ``a = dropout(dense(selfattn(x)))``;
- ``MLP_Adapter`` where ``mlp_adapter_conf[i]`` is 1: parallel to the feed-forward block,
  inside its residual: ``LN(f + mlp_adapter_scale * adapter(h) + h)``,
  ``f = dropout(dense(intermediate(h)))``, ``h`` the attention output.

Config keys: ``adapter_ratio`` (shared with ``Gene_token_prompt``), ``space_adapter_conf``,
``mlp_adapter_conf``, ``mlp_adapter_scale``.
"""
from __future__ import annotations

from typing import Any

from .adapter import ADAPTER_KEYS, Adapter, adapter_width, check_adapter_ratio
from .base import PeftMethod, config_error, resolve_layer_list

#: parameter-name fragments of the method
ENCODER_KEYS = (".Space_Adapter.", ".MLP_Adapter.")


def _resolve(config: Any, source: str | None) -> None:
    # default: adapters in every layer
    resolve_layer_list(config, "mlp_adapter_conf", [1] * config.num_hidden_layers, source)
    resolve_layer_list(config, "space_adapter_conf", [1] * config.num_hidden_layers, source)
    if not isinstance(config.mlp_adapter_scale, (int, float)):
        raise config_error("mlp_adapter_scale", config.mlp_adapter_scale, "a number", source)


def _space_adapter(config: Any, layer_index: int | None) -> Adapter | None:
    if not config.space_adapter_conf[layer_index]:
        return None
    return Adapter(config.hidden_size, adapter_width(config))


def _mlp_adapter(config: Any, layer_index: int | None) -> Adapter | None:
    if not config.mlp_adapter_conf[layer_index]:
        return None
    return Adapter(config.hidden_size, adapter_width(config), scale=float(config.mlp_adapter_scale))


METHOD = PeftMethod(
    name="encoder_prompt",
    config_keys={**ADAPTER_KEYS, "mlp_adapter_conf": None, "space_adapter_conf": None, "mlp_adapter_scale": 0.5},
    trainable_fragments=ENCODER_KEYS,
    resolve=_resolve,
    validate=check_adapter_ratio,
    modules={"attention_output": _space_adapter, "ffn_output": _mlp_adapter},
)
