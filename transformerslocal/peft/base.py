"""The shape of a PEFT method: what one method module declares (:class:`PeftMethod`).

Every method module (``lora.py``, ``prefix.py``, ...) ends with one ``METHOD = PeftMethod(...)``
and :mod:`.registry` lists them, one line each. The model (``modeling_bert``) builds itself
at fixed hook points and asks the registry at each one; a method provides what it builds at
the points it uses and nothing elsewhere (``docs/peft_keys.md`` §8).

This module imports nothing of ``transformerslocal`` outside ``peft/``: ``configuration_bert``
and ``modeling_bert`` import the registry, never the other way round. A ``config`` below is a
:class:`transformerslocal.BertConfig`.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

import torch
from torch import nn

#: The linear projections of an encoder layer a method may replace, by their path inside
#: ``encoder.layer.N`` (the checkpoint names, so a replacement must keep ``weight`` / ``bias``).
LINEAR_PATHS = (
    "attention.self.query",
    "attention.self.key",
    "attention.self.value",
    "attention.output.dense",
    "intermediate.dense",
    "output.dense",
)



def linear_paths(config: Any) -> tuple[str, ...]:
    """The projections of an encoder layer that methods may target under ``config``.

    A family whose layers have other projections than BERT's declares them as
    ``config.peft_linear_paths`` (CellFM: ``attn.q_proj`` ... ``ffn.o_proj``); then the method
    keys (``lora_target_modules``, ``ia3_target_modules``) name those paths. Otherwise the BERT
    names of :data:`LINEAR_PATHS` (the Performer maps its projections onto them).
    """
    own = getattr(config, "peft_linear_paths", None)
    return LINEAR_PATHS if own is None else tuple(own)


def names_own_linears(config: Any) -> bool:
    """Whether ``config``'s family names its projections itself (see :func:`linear_paths`)."""
    return getattr(config, "peft_linear_paths", None) is not None


#: Points where a method may add a module of its own -> the attribute the module lives at
#: (fixed: the checkpoint contract). At most one active method may use a point. What the
#: model does with the module:
#:
#: - ``embedding_output`` (``bert.adapter``): ``E' = E + module(E)``, E the embedding output;
#: - ``attention_output`` (``encoder.layer.N.attention.Space_Adapter``): ``a = a + module(a)``
#:   before ``LN(a + x)``, a the attention output projection (after dropout);
#: - ``ffn_output`` (``encoder.layer.N.MLP_Adapter``): ``f = f + module(h)`` before
#:   ``LN(f + h)``, f the feed-forward output, h the attention block's output;
#: - ``layer_prompt`` (``encoder.layer.N.prompt_embeddings``): the first layer that has one calls
#:   ``hidden, mask = module.insert(hidden, mask)``, later ones ``module.overwrite(hidden)``, and
#:   the encoder output (and each hidden state returned) is ``first.remove(hidden)``.
MODULE_POINTS: Mapping[str, str] = MappingProxyType({
    "embedding_output": "bert.adapter",
    "attention_output": "encoder.layer.N.attention.Space_Adapter",
    "ffn_output": "encoder.layer.N.MLP_Adapter",
    "layer_prompt": "encoder.layer.N.prompt_embeddings",
})

ConfigCheck = Callable[[Any, str | None], None]
LinearBuilder = Callable[[Any, str, nn.Linear], nn.Module]
ModuleBuilder = Callable[[Any, int | None], nn.Module | None]
StateMerger = Callable[[nn.Module, dict[str, torch.Tensor]], dict[str, torch.Tensor]]


def config_error(key: str, value: Any, expected: str, source: str | None = None) -> ValueError:
    """The ``ValueError`` for a bad config key: names the key, the value and what is allowed.

    Parameters
    ----------
    key
        The config key.
    value
        The value found.
    expected
        What is allowed, as a phrase ("an integer >= 1").
    source
        The ``config.json`` the value was read from, if any.
    """
    where = f" in {source}" if source else ""
    return ValueError(f"config key '{key}'{where} has value {value!r}; expected {expected}")


def resolve_layer_list(config: Any, key: str, default: list[int], source: str | None) -> None:
    """Resolve a per-layer 0/1 list (``None`` -> ``default``) and check its length and values."""
    n_layers = config.num_hidden_layers
    conf = getattr(config, key)
    if conf is None:
        conf = default
    if (not isinstance(conf, (list, tuple)) or len(conf) != n_layers
            or any(v not in (0, 1) or isinstance(v, float) for v in conf)):
        raise config_error(key, conf, f"a list of {n_layers} zeros and ones (one per layer, "
                                      f"num_hidden_layers={n_layers})", source)
    setattr(config, key, [int(v) for v in conf])


@dataclass(frozen=True, eq=False)  # compared and hashed by identity: one object per method
class PeftMethod:
    """One PEFT method: its config keys, what it builds at which hook point, what trains.

    Parameters
    ----------
    name
        The name listed in ``prompt_type``.
    config_keys
        The ``config.json`` keys the method reads -> their defaults. A key shared by two
        methods (``adapter_ratio``, the ``lora_*`` keys of ``lora`` and ``dora``) is declared
        by both with the same default.
    trainable_fragments
        Parameter-name fragments the method owns, matched against ``"." + name``; what trains
        under the method (plus the head), what ``peft_model.safetensors`` holds.
    resolve
        ``resolve(config, source)``, run whether the method is on or not: fill defaults that
        depend on other keys (per-layer lists) and check types that must hold always.
    validate
        ``validate(config, source)``, run when the method is on: check its keys, raising
        :func:`config_error`.
    linear_targets
        ``linear_targets(config) -> frozenset`` of :data:`LINEAR_PATHS` the method replaces
        (called when it is on and validated); two active methods may not share one.
    build_linear
        ``build_linear(config, path, base) -> nn.Module``: the replacement of the projection
        ``base`` (an ``nn.Linear`` just built, same shape) at ``path``; it must keep the
        ``weight`` and ``bias`` names.
    modules
        Hook point (a key of :data:`MODULE_POINTS`) -> ``build(config, layer_index)`` returning
        the module to put there, or ``None`` where the method adds nothing (``layer_index`` is
        ``None`` at ``embedding_output``).
    merge_state_dict
        ``merge_state_dict(model, state) -> state``: fold the method's updates into the base
        weights of a full state dict and drop its own keys; ``None`` if it cannot be merged.
    map_checkpoint_key
        ``map_checkpoint_key(key) -> key``: old spellings of the method's keys in checkpoints,
        applied on every load.
    """

    name: str
    config_keys: Mapping[str, Any]
    trainable_fragments: tuple[str, ...]
    resolve: ConfigCheck | None = None
    validate: ConfigCheck | None = None
    linear_targets: Callable[[Any], frozenset[str]] | None = None
    build_linear: LinearBuilder | None = None
    modules: Mapping[str, ModuleBuilder] = field(default_factory=dict)
    merge_state_dict: StateMerger | None = None
    map_checkpoint_key: Callable[[str], str] | None = None

    def __post_init__(self) -> None:
        if not self.name or "," in self.name:
            raise ValueError(f"PeftMethod name {self.name!r}: expected a non-empty name without commas")
        if not self.trainable_fragments:
            raise ValueError(f"PeftMethod {self.name!r}: trainable_fragments is empty; a method must own parameters")
        if (self.linear_targets is None) != (self.build_linear is None):
            raise ValueError(f"PeftMethod {self.name!r}: give linear_targets and build_linear together")
        unknown = sorted(set(self.modules) - set(MODULE_POINTS))
        if unknown:
            raise ValueError(f"PeftMethod {self.name!r}: unknown hook points {unknown}; "
                             f"expected names from {list(MODULE_POINTS)}")
        object.__setattr__(self, "config_keys", MappingProxyType(dict(self.config_keys)))
        object.__setattr__(self, "modules", MappingProxyType(dict(self.modules)))
        object.__setattr__(self, "trainable_fragments", tuple(self.trainable_fragments))

    @property
    def mergeable(self) -> bool:
        """Whether the method's updates can be folded into the base weights."""
        return self.merge_state_dict is not None

    def owns(self, parameter_name: str) -> bool:
        """Whether the parameter (or state-dict key) called ``parameter_name`` belongs to the method."""
        dotted = "." + parameter_name  # so "adapter." of a bare BertModel matches ".adapter." too
        return any(fragment in dotted for fragment in self.trainable_fragments)
