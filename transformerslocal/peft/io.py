"""PEFT weights on disk: the trainable part alone, applied on top of a base checkpoint
(``docs/peft_keys.md`` §5), and mergeable methods folded into the base weights for stock
``transformers`` (§6).

This module imports nothing above ``peft/``: :func:`load_peft_model` builds the model class it
is given, by default the one ``transformerslocal/__init__`` sets with
:func:`set_default_model_class` (``BertForSequenceClassification``).
"""
from __future__ import annotations

import logging
import os
from collections.abc import Iterable
from pathlib import Path

import torch
from torch import nn

from .registry import REGISTRY, merged_state_dict
from .trainable import _head_prefixes, trainable_parameter_names

logger = logging.getLogger(__name__)

PEFT_WEIGHTS_NAME = "peft_model.safetensors"

_default_model_class: type | None = None


def set_default_model_class(model_class: type) -> None:
    """Set the class :func:`load_peft_model` builds when given none.

    Parameters
    ----------
    model_class
        A ``BertPreTrainedModel`` subclass (it has ``config_class`` and ``from_pretrained``).
    """
    global _default_model_class
    _default_model_class = model_class


def peft_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The parameters that train under the model's config (methods + head), detached."""
    names = set(trainable_parameter_names(model))
    return {k: v.detach().contiguous() for k, v in model.state_dict().items() if k in names}


def save_peft_weights(model: nn.Module, directory: str | os.PathLike) -> Path:
    """Write ``peft_model.safetensors`` (the trainable part) and ``config.json``."""
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    file = directory / PEFT_WEIGHTS_NAME
    tmp = directory / (PEFT_WEIGHTS_NAME + ".tmp")
    save_file(peft_state_dict(model), str(tmp), metadata={"format": "pt", "prompt_type": model.config.prompt_type})
    os.replace(tmp, file)
    model.config.copy(architectures=[type(model).__name__]).save_pretrained(directory)
    return file


def load_peft_weights(model: nn.Module, path: str | os.PathLike) -> nn.Module:
    """Apply ``peft_model.safetensors`` (a file or the folder holding it) onto ``model``."""
    from safetensors.torch import load_file

    path = Path(path)
    file = path / PEFT_WEIGHTS_NAME if path.is_dir() else path
    if not file.is_file():
        raise FileNotFoundError(f"no PEFT weights: looked for {file}")
    state = load_file(str(file))
    own = model.state_dict()
    unknown = sorted(k for k in state if k not in own)
    if unknown:
        raise ValueError(f"{file} holds keys the model has no place for: {unknown[:10]}"
                         f"{' ...' if len(unknown) > 10 else ''}; was it saved with another prompt_type "
                         f"(model has {model.config.prompt_type!r})?")
    heads = _head_prefixes(model)
    expected = trainable_parameter_names(model)
    missing = [k for k in expected if k not in state and not k.startswith(heads)]
    if missing:
        raise ValueError(f"{file} lacks {len(missing)} tensors the model's PEFT modules need, which would stay "
                         f"at their start: {missing[:10]}{' ...' if len(missing) > 10 else ''}; was it saved with "
                         f"another prompt_type (model has {model.config.prompt_type!r})?")
    missing_head = [k for k in expected if k not in state and k.startswith(heads)]
    if missing_head:
        logger.warning("%s has no weights for the head %s; it keeps its current values", file, missing_head)
    wrong = [(k, tuple(v.shape), tuple(own[k].shape)) for k, v in state.items() if v.shape != own[k].shape]
    if wrong:
        raise ValueError(f"{file}: tensors of another shape than the model's: {wrong}")
    model.load_state_dict(state, strict=False)
    logger.info("applied %d PEFT tensors from %s", len(state), file)
    return model


def load_peft_model(base_path: str | os.PathLike, peft_path: str | os.PathLike, model_class: type | None = None,
                    **overrides):
    """The base checkpoint with the PEFT modules built from ``peft_path/config.json`` and
    their weights (and the head's) applied from ``peft_path/peft_model.safetensors``.

    Parameters
    ----------
    base_path
        The base checkpoint folder (e.g. a Geneformer ``BertForMaskedLM``).
    peft_path
        The folder :func:`save_peft_weights` wrote.
    model_class
        The model to build; default ``BertForSequenceClassification``.
    **overrides
        Config keys that replace those of ``peft_path/config.json``.
    """
    model_class = model_class or _default_model_class
    if model_class is None:
        raise TypeError("load_peft_model: no model_class given and no default set (import transformerslocal)")
    config = model_class.config_class.from_pretrained(peft_path, **overrides)
    model = model_class.from_pretrained(base_path, config=config)
    return load_peft_weights(model, peft_path)


def _merge(model: nn.Module, methods: tuple[str, ...], caller: str) -> nn.Module:
    config = model.config
    for name in methods:
        if not config.uses(name):
            raise ValueError(f"{caller}: the model's prompt_type {config.prompt_type!r} does not include {name!r}")
        if not REGISTRY[name].mergeable:
            mergeable = [n for n, m in REGISTRY.items() if m.mergeable]
            raise ValueError(f"{caller}: {name!r} cannot be merged into the base weights; mergeable: {mergeable}")
    remaining = ",".join(m for m in config.peft_methods if m not in methods)
    merged = type(model)(config.copy(prompt_type=remaining))
    merged.load_checkpoint_state(merged_state_dict(model, methods), source=f"merged {'+'.join(methods)} model",
                                 report_missing=False)
    if merged.loading_info["missing_keys"]:
        raise AssertionError(f"{caller} left keys unset: {merged.loading_info['missing_keys']}")
    return merged.train(model.training)


def merge_peft(model: nn.Module, methods: str | Iterable[str] | None = None) -> nn.Module:
    """A new model of the same class with the updates of ``methods`` folded into the base
    weights and without their modules; the other methods stay as they are. With only mergeable
    methods the result is a plain BERT that stock ``transformers`` loads.

    Parameters
    ----------
    model
        A model whose ``prompt_type`` lists ``methods``.
    methods
        A method name, several, or ``None`` for every mergeable method the model uses
        (``lora``, ``ia3``, ``dora``; ``docs/peft_keys.md`` §6).

    Raises
    ------
    ValueError
        If a method is not in the model's ``prompt_type``, cannot be merged, or (``None``) the
        model uses no mergeable method.
    """
    if methods is None:
        names = tuple(m for m in model.config.peft_methods if REGISTRY[m].mergeable)
        if not names:
            raise ValueError(f"merge_peft: the model's prompt_type {model.config.prompt_type!r} has no mergeable "
                             f"method; mergeable: {[n for n, m in REGISTRY.items() if m.mergeable]}")
    else:
        names = (methods,) if isinstance(methods, str) else tuple(methods)
    return _merge(model, names, "merge_peft")


def merge_lora(model: nn.Module) -> nn.Module:
    """A new model of the same class whose weights hold ``W + (alpha/r) B A`` and that has no
    LoRA modules. With LoRA alone the result is a plain BERT that stock ``transformers`` loads."""
    return _merge(model, ("lora",), "merge_lora")
