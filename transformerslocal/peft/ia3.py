"""``ia3``: (IA)^3, learned scaling vectors on chosen projections (``docs/peft_keys.md`` §3.5).

As HuggingFace ``peft``'s ``IA3Config`` for BERT (``target_modules=["key", "value",
"output.dense"]``, ``feedforward_modules=["output.dense"]``): each targeted ``nn.Linear``
becomes an :class:`IA3Linear` with a vector ``ia3_l``;

- a feed-forward module scales its INPUT: ``y = (x * l) W^T + b``, ``l`` of size ``in_features``;
- any other scales its OUTPUT, bias included: ``y = (x W^T + b) * l``, ``l`` of size ``out_features``.

``l`` starts at ones, so the model starts exactly equal to the base model. Names match like
peft's list form: a name selects the projections whose path inside ``encoder.layer.N`` is the
name or ends with ``"." + name``. So ``"output.dense"`` selects BOTH ``attention.output.dense``
and the feed-forward ``output.dense`` (this is what peft wraps for BERT, and what
``feedforward_modules=["output.dense"]`` makes input-scaled); ``"attention.output.dense"``
selects the attention output alone.

On a family that names its own projections (CellFM: ``attn.k_proj``, ``ffn.o_proj`` ...;
``base.linear_paths``) the names are those paths, matched the same way.

Config keys: ``ia3_target_modules``, ``ia3_feedforward_modules``.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .base import PeftMethod, config_error, linear_paths, names_own_linears
from .quantize import dense_weight

IA3_KEYS = (".ia3_l",)
#: the names ``ia3_target_modules`` / ``ia3_feedforward_modules`` may hold
IA3_TARGETS = ("query", "key", "value", "attention.output.dense", "intermediate.dense", "output.dense")


class IA3Linear(nn.Linear):
    """An ``nn.Linear`` (``weight`` / ``bias`` keep their names) with a scaling vector ``ia3_l``.

    Parameters
    ----------
    in_features, out_features, bias
        As ``nn.Linear``.
    feedforward
        Scale the input (``ia3_l`` of size ``in_features``) rather than the output
        (size ``out_features``).
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *, feedforward: bool = False) -> None:
        super().__init__(in_features, out_features, bias)
        self.feedforward = feedforward
        self.ia3_l = nn.Parameter(torch.ones(in_features if feedforward else out_features))

    def reset_peft_parameters(self) -> None:
        nn.init.ones_(self.ia3_l)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.feedforward:
            return F.linear(x * self.ia3_l.to(x.dtype), self.weight, self.bias)
        y = F.linear(x, self.weight, self.bias)
        return y * self.ia3_l.to(y.dtype)

    @torch.no_grad()
    def merged_weight_and_bias(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The ``weight`` and ``bias`` of a plain ``nn.Linear`` computing the same function."""
        weight = dense_weight(self.weight)
        if self.feedforward:  # (x * l) W^T = x (W diag(l))^T
            return weight * self.ia3_l, self.bias
        bias = None if self.bias is None else self.bias * self.ia3_l
        return self.ia3_l[:, None] * weight, bias

    def extra_repr(self) -> str:
        return super().extra_repr() + f", feedforward={self.feedforward}"


def _selects(name: str, path: str) -> bool:
    return path == name or path.endswith("." + name)


def _check_names(config: Any, key: str, source: str | None, *, allow_empty: bool) -> list[str]:
    names = getattr(config, key)
    allowed = linear_paths(config) if names_own_linears(config) else IA3_TARGETS
    what = "a list" + (" (may be empty)" if allow_empty else ", non-empty,") + f" of names from {list(allowed)}"
    if (not isinstance(names, (list, tuple)) or (not names and not allow_empty)
            or any(n not in allowed for n in names)):
        raise config_error(key, names, what, source)
    return list(names)


def _validate(config: Any, source: str | None) -> None:
    targets = _check_names(config, "ia3_target_modules", source, allow_empty=False)
    feedforward = _check_names(config, "ia3_feedforward_modules", source, allow_empty=True)
    outside = [n for n in feedforward if n not in targets]
    if outside:  # as peft: feedforward_modules must be a subset of target_modules
        raise config_error("ia3_feedforward_modules", config.ia3_feedforward_modules,
                           f"names also in ia3_target_modules ({targets}); {outside} are not", source)


def _targets(config: Any) -> frozenset[str]:
    return frozenset(p for p in linear_paths(config) if any(_selects(n, p) for n in config.ia3_target_modules))


def _build_linear(config: Any, path: str, base: nn.Linear) -> IA3Linear:
    feedforward = any(_selects(n, path) for n in config.ia3_feedforward_modules)
    return IA3Linear(base.in_features, base.out_features, base.bias is not None, feedforward=feedforward)


@torch.no_grad()
def merge_into(model: nn.Module, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``state`` (the model's state dict) with every ``ia3_l`` folded into its projection."""
    for name, module in model.named_modules():
        if isinstance(module, IA3Linear):
            weight, bias = module.merged_weight_and_bias()
            state[f"{name}.weight"] = weight
            if bias is not None:
                state[f"{name}.bias"] = bias
            state.pop(f"{name}.ia3_l", None)
    return state


METHOD = PeftMethod(
    name="ia3",
    config_keys={"ia3_target_modules": ["key", "value", "output.dense"], "ia3_feedforward_modules": ["output.dense"]},
    trainable_fragments=IA3_KEYS,
    validate=_validate,
    linear_targets=_targets,
    build_linear=_build_linear,
    merge_state_dict=merge_into,
)
