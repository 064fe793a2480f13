"""``Gene_token_prompt``: one bottleneck adapter ``bert.adapter`` on the embedding output,
``E' = E + adapter(E)``, before the encoder (``docs/peft_keys.md`` §3.3).

Config key: ``adapter_ratio`` (shared with ``encoder_prompt``).
"""
from __future__ import annotations

from typing import Any

from .adapter import ADAPTER_KEYS, Adapter, adapter_width, check_adapter_ratio
from .base import PeftMethod

#: parameter-name fragments of the method (matched against "." + name, so ``bert.adapter.``
#: and a bare BertModel's ``adapter.`` both match)
GENE_TOKEN_KEYS = (".adapter.",)


def _embedding_adapter(config: Any, layer_index: int | None) -> Adapter:
    return Adapter(config.hidden_size, adapter_width(config))


METHOD = PeftMethod(
    name="Gene_token_prompt",
    config_keys=ADAPTER_KEYS,
    trainable_fragments=GENE_TOKEN_KEYS,
    validate=check_adapter_ratio,
    modules={"embedding_output": _embedding_adapter},
)
