"""``dora``: weight-decomposed low-rank adaptation (DoRA; HuggingFace ``peft``'s
``LoraConfig(use_dora=True)``) on the attention projections (``docs/peft_keys.md`` §3.6).

The projection ``W`` (out x in) is re-parameterised as a magnitude times a direction::

    W' = diag(m / ||W + s B A||) (W + s B A),      s = lora_alpha / lora_r

with ``||.||`` the L2 norm of each row (one per output feature), ``A`` (r x in), ``B`` (out x r)
and ``m`` (out) trained. As in peft (and section 4.3 of the DoRA paper) the norm is treated as
a constant: it is recomputed in every forward but detached from the gradient. Forward, with
``g = m / ||W + s B A||``::

    y = x W^T + b + (g - 1) * (drop(x) W^T) + g * s * drop(x) A^T B^T

``B`` starts at zero and ``m`` at ``||W||`` (computed from the weights actually loaded, see
:meth:`DoRALinear._load_from_state_dict`), so ``g = 1`` and the model starts exactly equal to
the base model. ``merge_peft`` folds ``W'`` into ``weight`` (the bias is unchanged).

Config keys: those of ``lora`` (``lora_r``, ``lora_alpha``, ``lora_dropout``,
``lora_target_modules``; ``lora_merge_weights`` does not apply). ``lora`` and ``dora`` replace
the same projections, so listing both is a ``ValueError`` (one projection takes one method).
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..dropout import Dropout
from .base import PeftMethod
from .lora import LORA_RANK_KEYS, check_rank_keys, rank_targets
from .quantize import dense_weight

DORA_KEYS = (".dora_A", ".dora_B", ".dora_magnitude")


class DoRALinear(nn.Linear):
    """An ``nn.Linear`` (``weight`` / ``bias`` keep their names) with DoRA's ``dora_A``,
    ``dora_B`` and ``dora_magnitude``.

    Parameters
    ----------
    in_features, out_features, bias
        As ``nn.Linear``.
    r
        The rank.
    alpha
        ``lora_alpha``; the update is scaled by ``alpha / r``.
    dropout
        Dropout on the input of the update (training only).
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *, r: int, alpha: float,
                 dropout: float = 0.0) -> None:
        super().__init__(in_features, out_features, bias)
        self.r = r
        self.scaling = alpha / r
        self.dora_A = nn.Parameter(torch.empty(r, in_features))
        self.dora_B = nn.Parameter(torch.empty(out_features, r))
        self.dora_magnitude = nn.Parameter(torch.empty(out_features))
        self.dora_dropout = Dropout(dropout)
        self.reset_peft_parameters()

    @torch.no_grad()
    def reset_peft_parameters(self) -> None:
        nn.init.kaiming_uniform_(self.dora_A, a=5 ** 0.5)
        nn.init.zeros_(self.dora_B)
        self.dora_magnitude.copy_(self.weight_norm())

    def delta_weight(self) -> torch.Tensor:
        """``s B A`` (out x in)."""
        return self.scaling * (self.dora_B @ self.dora_A)

    @torch.no_grad()
    def weight_norm(self) -> torch.Tensor:
        """``||W + s B A||`` per row (out), detached."""
        return torch.linalg.norm(dense_weight(self.weight) + self.delta_weight(), dim=1)

    @torch.no_grad()
    def restart_magnitude(self) -> None:
        """After the base weight is quantized (``quantize.quantize_base``): a layer still at its
        start (``B = 0``) gets ``m = ||W||`` of the quantized ``W``, so it starts equal to that base."""
        if not self.dora_B.any():
            self.dora_magnitude.copy_(self.weight_norm())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x, self.weight, self.bias)
        if self.training and self.dora_dropout.p > 0:
            h = self.dora_dropout(x)
            base = F.linear(h, self.weight)
        else:
            h = x
            base = y if self.bias is None else y - self.bias
        g = (self.dora_magnitude / self.weight_norm()).to(y.dtype)  # (out,)
        update = F.linear(F.linear(h, self.dora_A), self.dora_B) * self.scaling
        return y + (g - 1) * base + g * update

    @torch.no_grad()
    def merged_weight(self) -> torch.Tensor:
        """``diag(m / ||W + s B A||) (W + s B A)``: the weight of a plain ``nn.Linear``
        computing the same function (same bias)."""
        direction = dense_weight(self.weight) + self.delta_weight()
        return (self.dora_magnitude / torch.linalg.norm(direction, dim=1))[:, None] * direction

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        # A base checkpoint brings W but no magnitude: start m at ||W + s B A|| of the loaded W,
        # as peft does when it wraps a pretrained layer, so the model starts equal to the base.
        if prefix + "weight" in state_dict and prefix + "dora_magnitude" not in state_dict:
            with torch.no_grad():
                self.dora_magnitude.copy_(self.weight_norm())


def _build_linear(config: Any, path: str, base: nn.Linear) -> DoRALinear:
    return DoRALinear(base.in_features, base.out_features, base.bias is not None, r=config.lora_r,
                      alpha=config.lora_alpha, dropout=float(config.lora_dropout))


def _validate(config: Any, source: str | None) -> None:
    check_rank_keys(config, source, method="dora")


@torch.no_grad()
def merge_into(model: nn.Module, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``state`` (the model's state dict) with every DoRA layer folded into its ``weight``."""
    for name, module in model.named_modules():
        if isinstance(module, DoRALinear):
            state[f"{name}.weight"] = module.merged_weight()
            for key in ("dora_A", "dora_B", "dora_magnitude"):
                state.pop(f"{name}.{key}", None)
    return state


METHOD = PeftMethod(
    name="dora",
    config_keys=LORA_RANK_KEYS,
    trainable_fragments=DORA_KEYS,
    validate=_validate,
    linear_targets=rank_targets,
    build_linear=_build_linear,
    merge_state_dict=merge_into,
)
