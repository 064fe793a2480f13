"""Bottleneck adapters: Gene_token_prompt (``bert.adapter``) and encoder_prompt
(``attention.Space_Adapter``, ``MLP_Adapter``).

``h -> D_fc2(GELU(D_fc1(h)))`` with ``D_fc2`` zero-initialised, so a freshly built adapter
adds exactly zero and the model starts equal to the base model (Houlsby-style start;
the scPEFT reference initialised randomly).
"""
from __future__ import annotations

import torch
from torch import nn

#: parameter-name fragments owned by each adapter method
#: (matched against "." + name, so ``bert.adapter.`` and a bare BertModel's ``adapter.`` both match)
GENE_TOKEN_KEYS = (".adapter.",)
ENCODER_KEYS = (".Space_Adapter.", ".MLP_Adapter.")


class Adapter(nn.Module):
    """``d -> width -> d`` bottleneck, named ``D_fc1`` / ``D_fc2`` as in the reference."""

    def __init__(self, hidden_size: int, width: int) -> None:
        super().__init__()
        self.D_fc1 = nn.Linear(hidden_size, width)
        self.act = nn.GELU()
        self.D_fc2 = nn.Linear(width, hidden_size)

    def reset_peft_parameters(self) -> None:
        self.D_fc1.reset_parameters()
        nn.init.zeros_(self.D_fc2.weight)
        nn.init.zeros_(self.D_fc2.bias)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.D_fc2(self.act(self.D_fc1(hidden)))


def maybe_adapter(enabled: bool, hidden_size: int, width: int) -> Adapter | None:
    """An adapter when ``enabled``; ``None`` otherwise, so no parameter or key exists."""
    return Adapter(hidden_size, width) if enabled else None
