"""CellFM configuration: the encoder's sizes and settings, stored in ``config.json`` with
``model_type: "cellfm"``.

Sizes of the released 80M model: ``vocab_size = 27,856`` (27,855 genes + the pad row 0),
``hidden_size = 1536``, ``num_hidden_layers = 2``, ``num_attention_heads = 48`` (head dim 32),
``value_slots = 256``; the 800M model has 40 layers. What the model computes is described in
``docs/cellfm.md``. Every key found in a ``config.json`` round-trips, including keys this class
does not know, as for the other families.
"""
from __future__ import annotations

import copy
import logging
from pathlib import Path
from typing import Any

from .configuration_utils import ConfigBase, merge_label_overrides, parse_prompt_type
from .peft.base import config_error as _bad
from .peft.registry import check_config, config_defaults

logger = logging.getLogger(__name__)

MODEL_TYPE = "cellfm"

#: the classifier heads: ``linear`` (Linear(d, C) on the cls state) or ``mlp``
#: (Linear(d, h) - BatchNorm - LeakyReLU - Linear(h, C), h = ``classifier_hidden_size``)
CLASSIFIER_HEADS = ("linear", "mlp")
#: the classifier head's keys, which a fine-tuning method file (``--config``) may set
HEAD_KEYS = ("classifier_head", "classifier_hidden_size")

CELLFM_DEFAULTS: dict[str, Any] = {
    "vocab_size": 27856,          # gene_emb rows: pad row 0 + genes (+ rows up to a multiple of 8)
    "hidden_size": 1536,
    "num_hidden_layers": 2,
    "num_attention_heads": 48,
    "intermediate_size": 1536,    # width of the gated feed-forward (ffn.u_proj / v_proj rows)
    "value_slots": 256,           # the value encoder's soft bins (w1: 1 -> slots)
    "leaky_relu_slope": 0.2,      # MindSpore's default LeakyReLU slope, not torch's 0.01
    "layer_norm_eps": 1e-7,
    "max_genes": 2048,            # expressed genes per cell at most (the tokens after cls)
    "pad_token_id": 0,
    "classifier_head": "linear",
    "classifier_hidden_size": 128,
    "mask_ratio": 0.2,            # CellFMForMaskedValues: share of a cell's genes masked
    "problem_type": None,
    "model_type": MODEL_TYPE,
}

#: PEFT keys shared by every method (``docs/peft_keys.md`` §2); each method's own keys come from the registry.
PEFT_SHARED_DEFAULTS: dict[str, Any] = {
    "prompt_type": "",
    "if_use_prompt": True,
    "freeze_layers": 0,
    "freeze_preset": None,
    "finetune_max_length": None,
}
#: ``freeze_preset`` values: ``"cellfm"`` freezes the gene embedding and trains everything else (the
#: encoder layers, the value encoder, the cls token and the head): the fine-tuning recipe in use on
#: a gene embedding re-initialised for the lab's genes (``remap-vocab --reinit_all_rows``).
FREEZE_PRESETS = ("cellfm",)
#: The encoder's linear projections, by path inside ``encoder.N``: what ``lora_target_modules`` and
#: ``ia3_target_modules`` name on a CellFM model (``peft.base.linear_paths``).
LINEAR_PATHS = ("attn.q_proj", "attn.k_proj", "attn.v_proj", "attn.u_proj", "attn.o_proj",
                "ffn.u_proj", "ffn.v_proj", "ffn.o_proj")
#: The method keys whose registry defaults name BERT projections, with CellFM's counterparts:
#: LoRA / DoRA on q and v; IA3 on k and v (outputs scaled) and the feed-forward output (input scaled).
CELLFM_PEFT_DEFAULTS: dict[str, Any] = {
    "lora_target_modules": ["attn.q_proj", "attn.v_proj"],
    "ia3_target_modules": ["attn.k_proj", "attn.v_proj", "ffn.o_proj"],
    "ia3_feedforward_modules": ["ffn.o_proj"],
}
#: PEFT methods of the registry CellFM has no hook point for, and why.
UNSUPPORTED_PEFT = {"prefix_prompt": "prompt tokens have no place in CellFM's linear attention (its length scale "
                                     "1 / sqrt(genes) and the zeroed padded keys count real genes only)"}


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


class CellFMConfig(ConfigBase):
    """Configuration of a CellFM encoder.

    Parameters
    ----------
    **kwargs
        Any key of ``CELLFM_DEFAULTS``, the PEFT keys, ``num_labels`` / ``id2label`` /
        ``label2id`` for the classifier, and any other key, which is kept and written back verbatim.

    Raises
    ------
    ValueError
        If a key holds a value outside what is allowed; the message names the key, the value
        and what was expected.
    """

    def __init__(self, **kwargs: Any) -> None:
        self._source = kwargs.pop("_source", None)
        id2label = kwargs.pop("id2label", None)
        label2id = kwargs.pop("label2id", None)
        num_labels = kwargs.pop("num_labels", None)
        for key, default in {**CELLFM_DEFAULTS, **PEFT_SHARED_DEFAULTS, **config_defaults(),
                             **CELLFM_PEFT_DEFAULTS}.items():
            setattr(self, key, copy.deepcopy(kwargs.pop(key, default)))
        self._keep_extra_keys(kwargs)
        self._set_labels(id2label, label2id, num_labels)
        self.validate()

    # ------------------------------------------------------------------ derived sizes
    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def deepnorm_alpha(self) -> float:
        """The residual's weight in each post-norm: ``(2 * num_hidden_layers) ** 0.25``."""
        return (2 * self.num_hidden_layers) ** 0.25

    @property
    def peft_linear_paths(self) -> tuple[str, ...]:
        """The projections PEFT methods may target (:data:`LINEAR_PATHS`)."""
        return LINEAR_PATHS

    @property
    def max_position_embeddings(self) -> int:
        """The longest input: ``max_genes`` gene tokens plus the cls token (read as BERT's)."""
        return self.max_genes + 1

    # ------------------------------------------------------------------ PEFT
    def frozen_in_full_finetuning(self, name: str) -> bool:
        """Whether parameter ``name`` stays frozen when no PEFT method is on: ``freeze_preset``
        ``"cellfm"`` freezes the gene embedding (``gene_emb``) alone; ``freeze_layers`` N freezes
        the embeddings (gene, cls, value encoder) and the first N layers."""
        if self.freeze_preset == "cellfm":
            return name == "gene_emb"
        if self.freeze_layers <= 0:
            return False
        if name.startswith(("gene_emb", "cls_token", "value_enc.")):
            return True
        return any(name.startswith(f"encoder.{i}.") for i in range(self.freeze_layers))

    def _validate_peft(self) -> None:
        src = self._source
        if not isinstance(self.if_use_prompt, bool):
            raise _bad("if_use_prompt", self.if_use_prompt, "true or false", src)
        methods = parse_prompt_type(self.prompt_type, source=src)
        self.prompt_type = ",".join(methods)
        if self.if_use_prompt:
            for name in methods:
                if name in UNSUPPORTED_PEFT:
                    raise _bad("prompt_type", self.prompt_type, f"methods without {name!r}: a {MODEL_TYPE} model "
                               f"has no hook for it ({UNSUPPORTED_PEFT[name]})", src)
        check_config(self, methods if self.if_use_prompt else (), src)
        if not _is_int(self.freeze_layers) or not 0 <= self.freeze_layers <= self.num_hidden_layers:
            raise _bad("freeze_layers", self.freeze_layers, f"an integer in [0, {self.num_hidden_layers}]", src)
        self._check_freeze_preset(FREEZE_PRESETS, methods)
        length = self.finetune_max_length
        if length is not None and (not _is_int(length) or not 2 <= length <= self.max_position_embeddings):
            raise _bad("finetune_max_length", length, f"null or an integer in [2, {self.max_position_embeddings}] "
                       "(max_genes + 1)", src)

    # ------------------------------------------------------------------ checks
    def validate(self) -> None:
        """Check every key; raise ``ValueError`` when off."""
        src = self._source
        if self.model_type != MODEL_TYPE:
            raise _bad("model_type", self.model_type, f"{MODEL_TYPE!r} for a CellFM config", src)
        for key, low in (("vocab_size", 2), ("hidden_size", 1), ("num_hidden_layers", 1),
                         ("num_attention_heads", 1), ("intermediate_size", 1), ("value_slots", 1),
                         ("max_genes", 1), ("classifier_hidden_size", 1)):
            value = getattr(self, key)
            if not _is_int(value) or value < low:
                raise _bad(key, value, f"an integer >= {low}", src)
        if self.hidden_size % self.num_attention_heads:
            raise _bad("num_attention_heads", self.num_attention_heads,
                       f"a divisor of hidden_size ({self.hidden_size})", src)
        if not _is_int(self.pad_token_id) or not 0 <= self.pad_token_id < self.vocab_size:
            raise _bad("pad_token_id", self.pad_token_id, f"an integer in [0, {self.vocab_size})", src)
        if not _is_number(self.leaky_relu_slope) or not 0 <= self.leaky_relu_slope < 1:
            raise _bad("leaky_relu_slope", self.leaky_relu_slope, "a number in [0, 1) (CellFM: 0.2)", src)
        if not _is_number(self.layer_norm_eps) or not self.layer_norm_eps > 0:
            raise _bad("layer_norm_eps", self.layer_norm_eps, "a positive number (CellFM: 1e-7)", src)
        if not _is_number(self.mask_ratio) or not 0 < self.mask_ratio < 1:
            raise _bad("mask_ratio", self.mask_ratio, "a number in (0, 1)", src)
        if self.classifier_head not in CLASSIFIER_HEADS:
            raise _bad("classifier_head", self.classifier_head, f"one of {list(CLASSIFIER_HEADS)}", src)
        self._validate_peft()

    # ------------------------------------------------------------------ io
    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for key in list(CELLFM_DEFAULTS) + list(PEFT_SHARED_DEFAULTS) + list(config_defaults()) + self._extra_keys:
            out[key] = copy.deepcopy(getattr(self, key))
        out.update(self._label_dict())
        return dict(sorted(out.items()))

    @staticmethod
    def _merge_overrides(data: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
        merged = {**data, **overrides}
        old = data.get("num_hidden_layers")
        if "num_hidden_layers" in overrides and _is_int(old) and old >= 1 and overrides["num_hidden_layers"] != old:
            # per-layer PEFT lists written back at their default follow the new depth (re-resolved)
            for key, default in (("n_layers_conf", [1] + [0] * (old - 1)), ("mlp_adapter_conf", [1] * old),
                                 ("space_adapter_conf", [1] * old)):
                if key not in overrides and merged.get(key) == default:
                    merged.pop(key)
        return merge_label_overrides(merged, overrides)

    @classmethod
    def _check_file_data(cls, path: Path, data: dict[str, Any]) -> None:
        if data.get("model_type") != MODEL_TYPE:
            raise ValueError(f"{path}: model_type is {data.get('model_type')!r}; expected {MODEL_TYPE!r} "
                             "(BERT / scBERT checkpoints are read with BertConfig / PerformerConfig)")
