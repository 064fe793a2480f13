"""BERT configuration: HuggingFace's keys plus the flat PEFT keys of scPEFT.

Every key found in a ``config.json`` round-trips through :class:`BertConfig`, including
keys this class does not know (``architectures``, ``transformers_version``, ...), so a
Geneformer checkpoint's config can be read, edited and written back unchanged. The PEFT
keys, their defaults and their checks belong to the methods (``peft/registry.py``); this
module holds only the keys every method shares (``docs/peft_keys.md`` §2).
"""
from __future__ import annotations

import copy
import logging
from typing import Any

from .configuration_utils import ConfigBase, parse_prompt_type
from .peft.base import config_error as _bad
from .peft.registry import PEFT_METHODS, check_config, config_defaults  # noqa: F401 (PEFT_METHODS: re-exported)

logger = logging.getLogger(__name__)


# "cls": V2, the <cls> token at position 0, as "first"; "attention": learned attention weights over the genes
CLASSIFIER_POOLINGS = ("first", "mean", "cls", "attention")
ACTIVATIONS = ("gelu", "relu", "gelu_new", "gelu_pytorch_tanh", "silu", "swish", "tanh")

# HuggingFace BertConfig keys and defaults (bert-base values, as in transformers).
BERT_DEFAULTS: dict[str, Any] = {
    "vocab_size": 30522,
    "hidden_size": 768,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "intermediate_size": 3072,
    "hidden_act": "gelu",
    "hidden_dropout_prob": 0.1,
    "attention_probs_dropout_prob": 0.1,
    "max_position_embeddings": 512,
    "type_vocab_size": 2,
    "initializer_range": 0.02,
    "layer_norm_eps": 1e-12,
    "pad_token_id": 0,
    "position_embedding_type": "absolute",
    "classifier_dropout": None,
    "problem_type": None,
    "model_type": "bert",
}

# PEFT keys (docs/peft_keys.md §2, §3): the keys every method shares, then each method's own
# keys from the registry. Layer lists default to None there and are resolved against
# num_hidden_layers in validate(): prompts at the input layer only, adapters everywhere.
PEFT_DEFAULTS: dict[str, Any] = {
    "prompt_type": "",
    "if_use_prompt": True,
    **config_defaults(),
    "freeze_layers": 0,
    "classifier_pooling": "first",
}

# Keys a fine-tuned model records about its training, written only when set (a pretrained
# checkpoint's config.json stays as it was).
TASK_DEFAULTS: dict[str, Any] = {
    # longest input (tokens per cell) the classifier was fine-tuned on; prediction keeps it
    "finetune_max_length": None,
}


class BertConfig(ConfigBase):
    """Configuration of a BERT encoder with optional PEFT modules.

    Parameters
    ----------
    **kwargs
        Any HuggingFace ``BertConfig`` key, any PEFT key (see ``PEFT_DEFAULTS``), and any
        other key, which is kept and written back verbatim.

    Raises
    ------
    ValueError
        If a PEFT key holds a value outside what is allowed; the message names the key,
        the value and what was expected.
    """

    def __init__(self, **kwargs: Any) -> None:
        self._source = kwargs.pop("_source", None)
        id2label = kwargs.pop("id2label", None)
        label2id = kwargs.pop("label2id", None)
        num_labels = kwargs.pop("num_labels", None)
        for key, default in {**BERT_DEFAULTS, **PEFT_DEFAULTS, **TASK_DEFAULTS}.items():
            setattr(self, key, copy.deepcopy(kwargs.pop(key, default)))
        self._keep_extra_keys(kwargs)
        self._set_labels(id2label, label2id, num_labels)
        self.validate()

    # ------------------------------------------------------------------ PEFT
    def validate(self) -> None:
        """Resolve layer lists and check every PEFT key (each method checks its own, through the
        registry); raise ``ValueError`` when off."""
        src = self._source
        # types first: a "2002" or 2002.0 from a hand-edited config.json fails here, naming the key,
        # not deep inside torch
        for key, low in (("vocab_size", 1), ("hidden_size", 1), ("num_hidden_layers", 1), ("num_attention_heads", 1),
                         ("intermediate_size", 1), ("max_position_embeddings", 1), ("type_vocab_size", 1),
                         ("pad_token_id", 0)):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise _bad(key, value, f"an integer >= {low}", src)
        for key in ("hidden_dropout_prob", "attention_probs_dropout_prob"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
                raise _bad(key, value, "a number in [0, 1)", src)
        for key in ("layer_norm_eps", "initializer_range"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
                raise _bad(key, value, "a number > 0", src)
        n_layers = self.num_hidden_layers
        if self.hidden_size % self.num_attention_heads:
            raise _bad("hidden_size", self.hidden_size,
                       f"a multiple of num_attention_heads ({self.num_attention_heads})", src)
        if self.hidden_act not in ACTIVATIONS:
            raise _bad("hidden_act", self.hidden_act, f"one of {list(ACTIVATIONS)}", src)
        if self.position_embedding_type != "absolute":
            raise _bad("position_embedding_type", self.position_embedding_type, "'absolute'", src)
        if not isinstance(self.if_use_prompt, bool):
            raise _bad("if_use_prompt", self.if_use_prompt, "true or false", src)
        methods = parse_prompt_type(self.prompt_type, source=src)
        self.prompt_type = ",".join(methods)

        check_config(self, methods if self.if_use_prompt else (), src)
        if (not isinstance(self.freeze_layers, int) or isinstance(self.freeze_layers, bool)
                or not 0 <= self.freeze_layers <= n_layers):
            raise _bad("freeze_layers", self.freeze_layers, f"an integer in [0, {n_layers}]", src)
        if self.classifier_pooling not in CLASSIFIER_POOLINGS:
            raise _bad("classifier_pooling", self.classifier_pooling, f"one of {list(CLASSIFIER_POOLINGS)}", src)
        length = self.finetune_max_length
        if length is not None and (not isinstance(length, int) or isinstance(length, bool) or length < 1):
            raise _bad("finetune_max_length", length, "null or an integer >= 1", src)

    @property
    def adapter_width(self) -> int:
        """Bottleneck width of the adapters, ``int(adapter_ratio * hidden_size)``."""
        return int(self.adapter_ratio * self.hidden_size)

    # ------------------------------------------------------------------ io
    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for key in list(BERT_DEFAULTS) + list(PEFT_DEFAULTS) + self._extra_keys:
            out[key] = copy.deepcopy(getattr(self, key))
        out.update({key: getattr(self, key) for key in TASK_DEFAULTS if getattr(self, key) is not None})
        out.update(self._label_dict())
        return dict(sorted(out.items()))
