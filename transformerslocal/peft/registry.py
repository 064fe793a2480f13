"""The PEFT methods, one line each, and the questions the model and the config ask them.

``configuration_bert`` asks for the keys and their checks (:func:`config_defaults`,
:func:`check_config`), ``modeling_bert`` asks at each hook point what to build
(:func:`peft_linear`, :func:`peft_module`), ``trainable`` and ``io`` ask who owns a parameter
and how to merge (:func:`owner_of`, :func:`merged_state_dict`). No caller names a method.
Adding a method: one module with ``METHOD = PeftMethod(...)`` and one line below
(``docs/peft_keys.md`` §8).
"""
from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from . import dora, encoder_adapter, gene_token, ia3, lora, prefix
from .base import MODULE_POINTS, PeftMethod, config_error, linear_paths


def _index(*methods: PeftMethod) -> dict[str, PeftMethod]:
    registry: dict[str, PeftMethod] = {}
    defaults: dict[str, tuple[str, Any]] = {}
    for method in methods:
        if method.name in registry:
            raise ValueError(f"two PEFT methods are called {method.name!r}")
        for key, default in method.config_keys.items():
            if key in defaults and defaults[key][1] != default:
                raise ValueError(f"config key {key!r}: default {default!r} in {method.name!r} but "
                                 f"{defaults[key][1]!r} in {defaults[key][0]!r}; a shared key has one default")
            defaults.setdefault(key, (method.name, default))
        registry[method.name] = method
    return registry


#: every PEFT method by name, in the order ``PEFT_METHODS`` lists them; one line per method
REGISTRY: dict[str, PeftMethod] = _index(
    lora.METHOD,
    prefix.METHOD,
    gene_token.METHOD,
    encoder_adapter.METHOD,
    ia3.METHOD,
    dora.METHOD,
)

#: the names ``prompt_type`` may list
PEFT_METHODS: tuple[str, ...] = tuple(REGISTRY)

#: parameter-name fragments each method owns
METHOD_KEYS: dict[str, tuple[str, ...]] = {name: m.trainable_fragments for name, m in REGISTRY.items()}


def config_defaults() -> dict[str, Any]:
    """Every method's config keys -> defaults, in registry order (a shared key once)."""
    out: dict[str, Any] = {}
    for method in REGISTRY.values():
        for key, default in method.config_keys.items():
            out.setdefault(key, default)
    return out


def active_methods(config: Any) -> tuple[PeftMethod, ...]:
    """The methods switched on in ``config`` (``config.peft_methods``), in the order listed."""
    return tuple(REGISTRY[name] for name in config.peft_methods)


def check_config(config: Any, active: Iterable[str], source: str | None = None) -> None:
    """Resolve and check the method keys of ``config``; raise ``ValueError`` when off.

    Every method's ``resolve`` runs (per-layer lists are filled in whether the method is on or
    not), then the ``validate`` of each method in ``active``, then the combination: two active
    methods may not replace the same projection or use the same hook point.
    """
    active = tuple(active)
    for method in REGISTRY.values():
        if method.resolve is not None:
            method.resolve(config, source)
    for name in active:
        if REGISTRY[name].validate is not None:
            REGISTRY[name].validate(config, source)
    claimed: dict[str, str] = {}
    for name in active:
        method = REGISTRY[name]
        uses = [f"replace {path}" for path in sorted(method.linear_targets(config))] if method.linear_targets else []
        uses += [f"build {MODULE_POINTS[point]}" for point in method.modules]
        for use in uses:
            other = claimed.setdefault(use, name)
            if other != name:
                raise config_error("prompt_type", config.prompt_type,
                                   f"methods that change different modules; '{other}' and '{name}' both "
                                   f"{use} (one module takes one method)", source)


def peft_linear(config: Any, path: str, base: nn.Linear) -> nn.Module:
    """Hook point "linear": the projection at ``path`` (one of ``base.linear_paths(config)``) of an
    encoder layer: ``base`` itself, or its replacement by the active method that targets it."""
    paths = linear_paths(config)
    if path not in paths:
        raise ValueError(f"peft_linear: unknown projection {path!r}; expected one of {list(paths)}")
    for method in active_methods(config):
        if method.build_linear is not None and path in method.linear_targets(config):
            return method.build_linear(config, path, base)
    return base


def peft_module(point: str, config: Any, layer_index: int | None = None) -> nn.Module | None:
    """The module an active method puts at hook ``point`` (of layer ``layer_index``), or
    ``None``: then the model has no attribute value there, no parameter, no state-dict key."""
    if point not in MODULE_POINTS:
        raise ValueError(f"peft_module: unknown hook point {point!r}; expected one of {list(MODULE_POINTS)}")
    for method in active_methods(config):
        build = method.modules.get(point)
        if build is not None:
            return build(config, layer_index)
    return None


def owner_of(parameter_name: str, methods: Iterable[str] | None = None) -> str | None:
    """The method (among ``methods``, default all) that owns ``parameter_name``, or ``None``."""
    for name in (PEFT_METHODS if methods is None else methods):
        if REGISTRY[name].owns(parameter_name):
            return name
    return None


def map_checkpoint_key(key: str) -> str:
    """``key`` of a checkpoint with every method's old spellings mapped onto ours."""
    for method in REGISTRY.values():
        if method.map_checkpoint_key is not None:
            key = method.map_checkpoint_key(key)
    return key


def merged_state_dict(model: nn.Module, methods: Iterable[str]) -> dict[str, torch.Tensor]:
    """The model's state dict with the updates of ``methods`` (mergeable ones) folded into
    the base weights and their own keys removed."""
    state = model.state_dict()
    for name in methods:
        method = REGISTRY[name]
        if not method.mergeable:
            raise ValueError(f"PEFT method {name!r} cannot be merged into the base weights")
        state = method.merge_state_dict(model, state)
    return state
