"""Models of a run: the classifier built from a checkpoint + PEFT keys of ``--config`` + label
set, and a fine-tuned fold's classifier loaded back (full weights or PEFT weights on a base).

The model family (Geneformer's BERT or scBERT's Performer) is the checkpoint's: its
``config.json`` ``model_type`` picks the classes (:mod:`geneformer_peft.models.families`)."""
from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from geneformer_peft.errors import DataError
from geneformer_peft.models.families import family_of, family_of_config, model_type_of
from transformerslocal import BertConfig, BertForSequenceClassification, load_peft_model
from transformerslocal.modeling_utils import find_weights_file

logger = logging.getLogger(__name__)

__all__ = ["SHAPE_KEYS", "check_head_labels", "load_classifier", "load_fold_model", "resolve_config"]

#: architecture keys a --config file must agree on with a BERT checkpoint (each family's: families.py)
SHAPE_KEYS = ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size")
#: per-layer lists that do not carry over from a --config of another model family
_LAYER_LISTS = ("n_layers_conf", "mlp_adapter_conf", "space_adapter_conf")


def resolve_config(model_path: str | Path, *, config_path: str | Path | None = None, prompt_type: str | None = None,
                   use_prompt: bool | None = None, label2id: Mapping[str, int] | None = None,
                   overrides: Mapping[str, Any] | None = None) -> BertConfig:
    """The checkpoint's config with the PEFT keys of ``config_path`` applied, then the
    ``prompt_type`` / ``use_prompt`` overrides, then the label maps.

    Raises
    ------
    FileNotFoundError
        If the checkpoint folder has no ``config.json`` or no weights.
    ValueError
        If ``config_path`` describes another architecture than the checkpoint.
    """
    model_path = Path(model_path)
    if not model_path.is_dir():
        raise FileNotFoundError(f"--model_path {model_path} is not a folder; expected a checkpoint folder "
                                "with config.json and model.safetensors or pytorch_model.bin")
    find_weights_file(model_path)
    family = family_of(model_path)
    base = family.config_class.from_pretrained(model_path)
    changes: dict[str, Any] = {}
    if config_path is not None and model_type_of(config_path) not in family.model_type:
        # a method file of the other family (e.g. the example's BERT config.json for a scBERT
        # checkpoint): only its method choice and keys carry over, not its per-layer lists
        import json

        file = Path(config_path) / "config.json" if Path(config_path).is_dir() else Path(config_path)
        data = json.loads(file.read_text(encoding="utf-8"))
        carried = {k: data[k] for k in family.peft_keys if k in data and k not in _LAYER_LISTS}
        logger.info("--config %s is of model_type %r, --model_path %s of %r: using its PEFT keys %s",
                    config_path, model_type_of(config_path), model_path, family.model_type[0], sorted(carried))
        changes.update(carried)
    elif config_path is not None:
        method_config = family.config_class.from_pretrained(config_path)
        differ = [(k, getattr(method_config, k), getattr(base, k)) for k in family.shape_keys
                  if getattr(method_config, k) != getattr(base, k)]
        if differ:
            desc = ", ".join(f"{k}={a} (checkpoint has {b})" for k, a, b in differ)
            raise ValueError(f"--config {config_path} describes another model than --model_path {model_path}: "
                             f"{desc}; pick the config.json of the same model size")
        changes.update({k: getattr(method_config, k) for k in family.peft_keys})
    if prompt_type is not None:
        changes["prompt_type"] = prompt_type
    if use_prompt is not None:
        changes["if_use_prompt"] = bool(use_prompt)
    if label2id is not None:
        changes["id2label"] = {int(i): str(name) for name, i in label2id.items()}
        changes["label2id"] = {str(name): int(i) for name, i in label2id.items()}
    changes.update(overrides or {})
    return base.copy(**changes)


def load_classifier(model_path: str | Path, config: BertConfig) -> BertForSequenceClassification:
    """The checkpoint as a cell classifier under ``config`` (of the checkpoint's family); a
    fine-tuned head of another label set is a clear error."""
    family = family_of_config(config)
    try:
        model = family.classifier_class.from_pretrained(model_path, config=config)
    except ValueError as err:
        if family.head_out_weight in str(err):
            checkpoint = family.config_class.from_pretrained(model_path)
            raise ValueError(
                f"--model_path {model_path} carries a classifier head for {checkpoint.num_labels} labels "
                f"({sorted(checkpoint.label2id)}), but the data has {config.num_labels} "
                f"({sorted(config.label2id)}); start from the pretrained (not fine-tuned) checkpoint") from err
        raise
    if family.head_out_weight not in model.loading_info["missing_keys"]:
        check_head_labels(model_path, config)
    return model


def check_head_labels(model_path: str | Path, config: BertConfig) -> None:
    """A trained classifier row belongs to one named class: refuse a head trained on other
    label names (or another order) than the data's, instead of relabelling its rows silently."""
    trained = family_of_config(config).config_class.from_pretrained(model_path).id2label
    names = [trained[i] for i in sorted(trained)]
    if all(name == f"LABEL_{i}" for i, name in enumerate(names)):
        return  # the checkpoint never named its classes
    wanted = [config.id2label[i] for i in range(config.num_labels)]
    if names != wanted:
        raise ValueError(f"--model_path {model_path} carries a classifier trained on labels {names}, but the data's "
                         f"labels are {wanted}; start from the pretrained (not fine-tuned) checkpoint")


def load_fold_model(model_path: str | Path, base_model: str | Path | None = None) -> BertForSequenceClassification:
    """A fold's classifier: its full weights, or its PEFT weights on ``base_model``.

    Raises
    ------
    DataError
        If the weights hold no trained classifier head (e.g. a pretrained, not fine-tuned,
        checkpoint), which would predict at random.
    """
    family = family_of(model_path)
    if base_model is not None:
        from safetensors import safe_open

        from transformerslocal.peft import PEFT_WEIGHTS_NAME

        peft_file = Path(model_path) / PEFT_WEIGHTS_NAME
        if peft_file.is_file():
            with safe_open(str(peft_file), framework="pt") as handle:
                if not any(k.startswith(family.head_prefix) for k in handle.keys()):
                    raise DataError(f"{peft_file} holds no classifier weights; expected the "
                                    f"{PEFT_WEIGHTS_NAME} of a fold folder written by the fine-tuning job")
        return load_peft_model(base_model, model_path, model_class=family.classifier_class)
    model = family.classifier_class.from_pretrained(model_path)
    untrained = [k for k in model.loading_info.get("missing_keys", []) if k.startswith(family.head_prefix)]
    if untrained:
        raise DataError(f"--model_path {model_path} has no trained classifier head ({untrained} not in its weights); "
                        "expected a fold folder written by the fine-tuning job, not a pretrained checkpoint")
    return model
