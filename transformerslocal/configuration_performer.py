"""scBERT configuration: the ``PerformerLM`` constructor arguments of performer-pytorch, plus
the fine-tuning head's sizes, stored in ``config.json`` with ``model_type: "scbert"``.

Every key found in a ``config.json`` round-trips through :class:`PerformerConfig`, including
keys this class does not know (``architectures``, PEFT keys added by other code, ...), as
for :class:`~.configuration_bert.BertConfig`.

Sizes of the released scBERT (``panglao_pretrain.pth``): ``num_tokens = bin_num + 2 = 7``,
``max_seq_len = gene_num + 1 = 16,907``, ``dim = 200``, ``depth = 6``, ``heads = 10``,
``dim_head = 64`` (performer-pytorch's default; inner width 640), ``nb_features = 266``
(``int(dim_head * ln(dim_head))``), ``feature_redraw_interval = 1000``.
"""
from __future__ import annotations

import copy
import logging
import math
from pathlib import Path
from typing import Any

from .configuration_utils import ConfigBase, merge_label_overrides, parse_prompt_type
from .peft.base import config_error as _bad
from .peft.registry import check_config, config_defaults

logger = logging.getLogger(__name__)

MODEL_TYPE = "scbert"

#: How the key features are stabilised before ``exp`` (see ``docs/scbert.md``, "Kernel"):
#: ``"head"``: subtract the maximum over positions and features of each cell and head
#: (performer-pytorch >= 1.0, 1.1.4 included); ``"cell"``: the maximum over all heads,
#: positions and features of each cell (the performer copy vendored by the scBERT release,
#: which takes the maximum over the whole batch, run one cell at a time as its predict.py does).
KEY_STABILIZERS = ("head", "cell")
POS_EMBEDDINGS = ("gene2vec", "none")

# PerformerLM arguments (performer-pytorch names) with scBERT's values as defaults.
PERFORMER_DEFAULTS: dict[str, Any] = {
    "num_tokens": 7,               # bin_num + 2: bins 0..bin_num, then the mask token
    "max_seq_len": 16907,          # gene_num + 1: one position per panel gene, then one extra
    "dim": 200,
    "depth": 6,
    "heads": 10,
    "dim_head": 64,
    "nb_features": None,           # None -> int(dim_head * ln(dim_head)), resolved on load
    "feature_redraw_interval": 1000,  # training forward calls between redraws; None: never
    "generalized_attention": False,
    "ortho_scaling": 0,
    "ff_mult": 4,
    "ff_chunks": 1,                # feed-forward run over this many slices of the positions (memory)
    "ff_glu": False,
    "emb_dropout": 0.0,
    "ff_dropout": 0.0,
    "attn_dropout": 0.0,
    "local_attn_heads": 0,
    "qkv_bias": False,
    "attn_out_bias": True,
    "kernel_eps": 1e-4,
    "layer_norm_eps": 1e-5,
    "key_stabilizer": "head",
    "pos_embedding": "gene2vec",   # frozen gene vectors, a zero row for the extra position; "none": no embedding
    "pos_embedding_seed": 0,       # the fixed random embedding used when no gene2vec vectors are given
    "classifier_hidden_sizes": [512, 128],
    "classifier_dropout": 0.0,
    "problem_type": None,
    "model_type": MODEL_TYPE,
}

#: PEFT keys shared by every method (``docs/peft_keys.md`` §2; ``freeze_preset`` is scBERT's own,
#: ``docs/scbert.md`` "PEFT"); each method's own keys come from the registry.
PEFT_SHARED_DEFAULTS: dict[str, Any] = {
    "prompt_type": "",
    "if_use_prompt": True,
    "freeze_layers": 0,
    "freeze_preset": None,
    "finetune_max_length": None,  # the job records the input length; for scBERT always max_seq_len
}
#: ``freeze_preset`` values: ``"scbert"`` trains the final LayerNorm, the second-to-last layer
#: and the head, the scBERT release's fine-tuning recipe.
FREEZE_PRESETS = ("scbert",)
#: PEFT methods of the registry a Performer has no hook point for.
UNSUPPORTED_PEFT = ("prefix_prompt",)

# Settings performer-pytorch offers that scBERT does not use; only these values are built.
_UNSUPPORTED = {"generalized_attention": False, "ff_glu": False, "local_attn_heads": 0}


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


class PerformerConfig(ConfigBase):
    """Configuration of a scBERT model (performer-pytorch's ``PerformerLM``, non-causal).

    Parameters
    ----------
    **kwargs
        Any key of ``PERFORMER_DEFAULTS``, ``num_labels`` / ``id2label`` / ``label2id``
        for the classifier, and any other key, which is kept and written back verbatim.

    Raises
    ------
    ValueError
        If a key holds a value outside what is allowed; the message names the key, the
        value and what was expected.

    Notes
    -----
    ``hidden_size``, ``num_hidden_layers``, ``num_attention_heads``, ``vocab_size`` and
    ``max_position_embeddings`` are read-only aliases of ``dim``, ``depth``, ``heads``,
    ``num_tokens`` and ``max_seq_len``, so that code written against the BERT config
    (adapter widths, per-layer lists) reads a Performer config alike.
    """

    def __init__(self, **kwargs: Any) -> None:
        self._source = kwargs.pop("_source", None)
        id2label = kwargs.pop("id2label", None)
        label2id = kwargs.pop("label2id", None)
        num_labels = kwargs.pop("num_labels", None)
        for alias in _ALIASES:
            if alias in kwargs:
                raise _bad(alias, kwargs[alias], f"no such key in a {MODEL_TYPE} config (it reads "
                           f"{_ALIASES[alias]!r}; set that instead)", self._source)
        for key, default in {**PERFORMER_DEFAULTS, **PEFT_SHARED_DEFAULTS, **config_defaults()}.items():
            setattr(self, key, copy.deepcopy(kwargs.pop(key, default)))
        self._keep_extra_keys(kwargs)
        self._set_labels(id2label, label2id, num_labels)
        self.validate()

    # ------------------------------------------------------------------ derived sizes
    @property
    def bin_num(self) -> int:
        """Highest expression bin (tokens ``0..bin_num``); scBERT's default 5."""
        return self.num_tokens - 2

    @property
    def mask_token_id(self) -> int:
        """``bin_num + 1``, the mask token of pretraining (also the MLM ignore label)."""
        return self.num_tokens - 1

    @property
    def gene_num(self) -> int:
        """Number of panel genes: ``max_seq_len - 1`` (the last position is the extra one)."""
        return self.max_seq_len - 1

    @property
    def inner_dim(self) -> int:
        return self.heads * self.dim_head

    @property
    def hidden_size(self) -> int:
        return self.dim

    @property
    def num_hidden_layers(self) -> int:
        return self.depth

    @property
    def num_attention_heads(self) -> int:
        return self.heads

    @property
    def vocab_size(self) -> int:
        """The token vocabulary (``num_tokens``), read as the BERT config's."""
        return self.num_tokens

    @property
    def max_position_embeddings(self) -> int:
        """The input length (``max_seq_len``), read as the BERT config's."""
        return self.max_seq_len

    # ------------------------------------------------------------------ PEFT
    def frozen_in_full_finetuning(self, name: str) -> bool:
        """Whether parameter ``name`` stays frozen when no PEFT method is on: ``freeze_preset``
        ``"scbert"`` freezes all but ``norm.*``, ``performer.net.layers.{depth-2}.*`` and the head
        (``to_out.*``); ``freeze_layers`` N freezes the embeddings and the first N layers."""
        if self.freeze_preset == "scbert":
            trained = ("norm.", f"performer.net.layers.{self.depth - 2}.", "to_out.")
            return not name.startswith(trained)
        if self.freeze_layers <= 0:
            return False
        if name.startswith(("token_emb.", "pos_emb.")):
            return True
        return any(name.startswith(f"performer.net.layers.{i}.") for i in range(self.freeze_layers))

    def _validate_peft(self) -> None:
        src = self._source
        if not isinstance(self.if_use_prompt, bool):
            raise _bad("if_use_prompt", self.if_use_prompt, "true or false", src)
        methods = parse_prompt_type(self.prompt_type, source=src)
        self.prompt_type = ",".join(methods)
        for name in UNSUPPORTED_PEFT:
            if name in methods and self.if_use_prompt:
                raise _bad("prompt_type", self.prompt_type, f"methods without {name!r}: a {MODEL_TYPE} model has "
                           "no prompt-token hook (its classifier reads every position)", src)
        check_config(self, methods if self.if_use_prompt else (), src)
        if not _is_int(self.freeze_layers) or not 0 <= self.freeze_layers <= self.depth:
            raise _bad("freeze_layers", self.freeze_layers, f"an integer in [0, {self.depth}]", src)
        length = self.finetune_max_length
        if length is not None and length != self.max_seq_len:
            raise _bad("finetune_max_length", length, f"null or max_seq_len ({self.max_seq_len}): a scBERT cell "
                       "holds every panel position, it is not truncated", src)
        self._check_freeze_preset(FREEZE_PRESETS, methods, requires=(
            (self.depth >= 2, f"a model of depth >= 2 (it trains layer depth-2; depth is {self.depth})"),))

    # ------------------------------------------------------------------ checks
    def validate(self) -> None:
        """Resolve ``nb_features`` and check every key; raise ``ValueError`` when off."""
        src = self._source
        if self.model_type != MODEL_TYPE:
            raise _bad("model_type", self.model_type, f"{MODEL_TYPE!r} for a Performer (scBERT) config", src)
        for key, low in (("num_tokens", 3), ("max_seq_len", 2), ("dim", 1), ("depth", 1), ("heads", 1),
                         ("dim_head", 1), ("ff_mult", 1), ("ff_chunks", 1)):
            value = getattr(self, key)
            if not _is_int(value) or value < low:
                raise _bad(key, value, f"an integer >= {low}", src)
        if self.nb_features is None:
            self.nb_features = int(self.dim_head * math.log(self.dim_head)) if self.dim_head > 1 else 1
        if not _is_int(self.nb_features) or self.nb_features < 1:
            raise _bad("nb_features", self.nb_features, "an integer >= 1 (or null for int(dim_head * ln(dim_head)))", src)
        interval = self.feature_redraw_interval
        if interval is not None and (not _is_int(interval) or interval < 0):
            raise _bad("feature_redraw_interval", interval, "an integer >= 0, or null to never redraw", src)
        for key, value in _UNSUPPORTED.items():
            if getattr(self, key) != value:
                raise _bad(key, getattr(self, key), f"{value!r} (scBERT's setting; the other performer-pytorch "
                           "variants are not built here)", src)
        if self.ortho_scaling not in (0, 1):
            raise _bad("ortho_scaling", self.ortho_scaling, "0 (random row norms) or 1 (sqrt(dim_head))", src)
        for key in ("emb_dropout", "ff_dropout", "attn_dropout", "classifier_dropout"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
                raise _bad(key, value, "a number in [0, 1)", src)
        for key in ("qkv_bias", "attn_out_bias"):
            if not isinstance(getattr(self, key), bool):
                raise _bad(key, getattr(self, key), "true or false", src)
        for key in ("kernel_eps", "layer_norm_eps"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
                raise _bad(key, value, "a positive number", src)
        if self.key_stabilizer not in KEY_STABILIZERS:
            raise _bad("key_stabilizer", self.key_stabilizer, f"one of {list(KEY_STABILIZERS)}", src)
        if self.pos_embedding not in POS_EMBEDDINGS:
            raise _bad("pos_embedding", self.pos_embedding, f"one of {list(POS_EMBEDDINGS)}", src)
        if not _is_int(self.pos_embedding_seed):
            raise _bad("pos_embedding_seed", self.pos_embedding_seed, "an integer", src)
        sizes = self.classifier_hidden_sizes
        if (not isinstance(sizes, (list, tuple)) or len(sizes) != 2
                or not all(_is_int(s) and s >= 1 for s in sizes)):
            raise _bad("classifier_hidden_sizes", sizes, "a list of two integers >= 1 (scBERT: [512, 128])", src)
        self.classifier_hidden_sizes = [int(s) for s in sizes]
        self._validate_peft()

    # ------------------------------------------------------------------ io
    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for key in list(PERFORMER_DEFAULTS) + list(PEFT_SHARED_DEFAULTS) + list(config_defaults()) + self._extra_keys:
            out[key] = copy.deepcopy(getattr(self, key))
        out.update(self._label_dict())
        return dict(sorted(out.items()))

    @staticmethod
    def _merge_overrides(data: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
        return _merge_overrides(data, overrides)

    @classmethod
    def _check_file_data(cls, path: Path, data: dict[str, Any]) -> None:
        if data.get("model_type", MODEL_TYPE) != MODEL_TYPE:
            raise ValueError(f"{path}: model_type is {data.get('model_type')!r}; expected {MODEL_TYPE!r} "
                             "(a BERT / Geneformer checkpoint is read with BertConfig)")


_ALIASES = {"hidden_size": "dim", "num_hidden_layers": "depth", "num_attention_heads": "heads",
            "vocab_size": "num_tokens", "max_position_embeddings": "max_seq_len"}


def _merge_overrides(data: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """``data`` with ``overrides`` applied; ``num_labels`` alone replaces the label maps when it
    differs from their size (as :class:`~.configuration_bert.BertConfig`)."""
    merged = {**data, **overrides}
    old_depth = data.get("depth")
    if "depth" in overrides and _is_int(old_depth) and old_depth >= 1 and overrides["depth"] != old_depth:
        # per-layer PEFT lists written back at their default follow the new depth (re-resolved)
        for key, default in (("n_layers_conf", [1] + [0] * (old_depth - 1)), ("mlp_adapter_conf", [1] * old_depth),
                             ("space_adapter_conf", [1] * old_depth)):
            if key not in overrides and merged.get(key) == default:
                merged.pop(key)
    return merge_label_overrides(merged, overrides)
