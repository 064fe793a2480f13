"""Shared builders for the PEFT tests: a tiny BERT config and one table of PEFT cases.

Sizes follow HF's BERT tests (vocab 99, hidden 32, 2 layers, 4 heads, intermediate 37):
odd sizes expose transposition bugs. Dropout is 0 so train-mode and eval-mode forwards
are comparable; tests that need dropout set it themselves.

Each case says which config keys it sets and, written independently of
``transformerslocal.peft.trainable``, which parameter names must train.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import pytest
import torch

from transformerslocal import BertConfig, BertForSequenceClassification

TINY = dict(
    vocab_size=99,
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    intermediate_size=37,
    max_position_embeddings=64,
    hidden_act="relu",
    hidden_dropout_prob=0.0,
    attention_probs_dropout_prob=0.0,
    num_labels=3,
    num_token=5,
)
# The 12L-30M Geneformer shape (docs/peft_keys.md §9), for parameter counts.
GF_12L_30M = dict(
    vocab_size=25426,
    hidden_size=512,
    num_hidden_layers=12,
    num_attention_heads=8,
    intermediate_size=1024,
    max_position_embeddings=2048,
    hidden_act="relu",
)
HEAD_PREFIXES = ("bert.pooler.", "classifier.")


def tiny_config(**overrides: Any) -> BertConfig:
    return BertConfig(**{**TINY, **overrides})


# ----------------------------------------------------------------------------- name predicates
def is_lora(name: str) -> bool:
    return name.endswith((".lora_A", ".lora_B"))


def is_prompt(name: str) -> bool:
    return ".prompt_embeddings." in name


def is_gene_token_adapter(name: str) -> bool:
    return name.startswith("bert.adapter.")


def is_encoder_adapter(name: str) -> bool:
    return ".attention.Space_Adapter." in name or ".MLP_Adapter." in name


def is_ia3(name: str) -> bool:
    return name.endswith(".ia3_l")


def is_dora(name: str) -> bool:
    return name.endswith((".dora_A", ".dora_B", ".dora_magnitude"))


def is_head(name: str) -> bool:
    return name.startswith(HEAD_PREFIXES)


METHOD_PREDICATES: dict[str, Callable[[str], bool]] = {
    "lora": is_lora,
    "prefix_prompt": is_prompt,
    "Gene_token_prompt": is_gene_token_adapter,
    "encoder_prompt": is_encoder_adapter,
    "ia3": is_ia3,
    "dora": is_dora,
}
#: parameters that scale something and start at a nonzero value (IA3's ones, DoRA's
#: magnitude ||W||): ``perturb_peft`` adds noise to them instead of replacing them
SCALE_LIKE = (".ia3_l", ".dora_magnitude")


def is_peft_module(name: str) -> bool:
    return any(pred(name) for pred in METHOD_PREDICATES.values())


# ----------------------------------------------------------------------------- the case table
@dataclass(frozen=True)
class Case:
    id: str
    overrides: dict = field(default_factory=dict)
    methods: tuple[str, ...] = ()  # the methods that are really on
    freeze_layers: int = 0

    @property
    def full(self) -> bool:
        return not self.methods

    @property
    def has_prefix(self) -> bool:
        return "prefix_prompt" in self.methods

    def config(self, **extra: Any) -> BertConfig:
        return tiny_config(**{**self.overrides, **extra})

    def expected_trainable(self, name: str) -> bool:
        """Which parameters must train, from docs/peft_keys.md (§3, §4), not from trainable.py."""
        if self.full:
            if self.freeze_layers == 0:
                return True
            frozen_layers = tuple(f"bert.encoder.layer.{i}." for i in range(self.freeze_layers))
            return not name.startswith(("bert.embeddings.",) + frozen_layers)
        return is_head(name) or any(METHOD_PREDICATES[m](name) for m in self.methods)


CASES = [
    Case("full", dict(prompt_type="")),
    Case("full_freeze1", dict(prompt_type="", freeze_layers=1), freeze_layers=1),
    Case("lora", dict(prompt_type="lora"), ("lora",)),
    Case("prefix_prompt", dict(prompt_type="prefix_prompt"), ("prefix_prompt",)),
    Case("Gene_token_prompt", dict(prompt_type="Gene_token_prompt"), ("Gene_token_prompt",)),
    Case("encoder_prompt", dict(prompt_type="encoder_prompt"), ("encoder_prompt",)),
    Case("gene_token+lora", dict(prompt_type="Gene_token_prompt,lora"), ("Gene_token_prompt", "lora")),
    Case("lora+prefix+encoder", dict(prompt_type="lora,prefix_prompt,encoder_prompt"),
         ("lora", "prefix_prompt", "encoder_prompt")),
    Case("all_four", dict(prompt_type="lora,prefix_prompt,Gene_token_prompt,encoder_prompt"),
         ("lora", "prefix_prompt", "Gene_token_prompt", "encoder_prompt")),
    Case("deep_prefix", dict(prompt_type="prefix_prompt", n_layers_conf=[1, 1]), ("prefix_prompt",)),
    Case("encoder_one_layer", dict(prompt_type="encoder_prompt", space_adapter_conf=[0, 1],
                                   mlp_adapter_conf=[0, 1]), ("encoder_prompt",)),
    Case("switched_off", dict(prompt_type="lora,prefix_prompt,Gene_token_prompt,encoder_prompt",
                              if_use_prompt=False)),
    Case("ia3", dict(prompt_type="ia3"), ("ia3",)),
    Case("dora", dict(prompt_type="dora"), ("dora",)),
    Case("ia3+gene_token", dict(prompt_type="ia3,Gene_token_prompt"), ("ia3", "Gene_token_prompt")),
    Case("dora_qkv+prefix", dict(prompt_type="dora,prefix_prompt", lora_target_modules=["query", "key", "value"],
                                 lora_r=4, lora_alpha=8), ("dora", "prefix_prompt")),
    Case("lora+ia3", dict(prompt_type="lora,ia3", ia3_target_modules=["key", "output.dense"]), ("lora", "ia3")),
    Case("ia3_intermediate", dict(prompt_type="ia3", ia3_target_modules=["query", "intermediate.dense"],
                                  ia3_feedforward_modules=["intermediate.dense"]), ("ia3",)),
    Case("dora+ia3+three", dict(prompt_type="dora,ia3,prefix_prompt,Gene_token_prompt,encoder_prompt",
                                lora_target_modules=["query"]),
         ("dora", "ia3", "prefix_prompt", "Gene_token_prompt", "encoder_prompt")),
    Case("switched_off_new", dict(prompt_type="ia3,dora,encoder_prompt", lora_target_modules=["query"],
                                  if_use_prompt=False)),
]
CASE_PARAMS = [pytest.param(c, id=c.id) for c in CASES]
PEFT_CASE_PARAMS = [pytest.param(c, id=c.id) for c in CASES if c.methods]


# ----------------------------------------------------------------------------- builders
def build(config: BertConfig, seed: int = 0, model_class=BertForSequenceClassification):
    torch.manual_seed(seed)
    return model_class(config)


def base_model(seed: int = 0, model_class=BertForSequenceClassification, **overrides: Any):
    """A plain BERT (no PEFT) with random weights: the "pretrained" model of a test."""
    return build(tiny_config(**overrides), seed, model_class).eval()


def from_base(case: Case, base, seed: int = 1, **extra: Any):
    """The case's model with ``base``'s weights loaded (PEFT modules at their start)."""
    model = build(case.config(**extra), seed, type(base))
    model.load_checkpoint_state(base.state_dict(), report_missing=False)
    return model


@torch.no_grad()
def perturb_peft(model, seed: int = 123, std: float = 0.1) -> None:
    """Give every PEFT parameter a nonzero random value, as if trained (LoRA B and adapter
    D_fc2 start at zero, which would hide most bugs); scale-like ones (IA3, DoRA magnitude)
    get the noise added to their start value."""
    gen = torch.Generator().manual_seed(seed)
    for name, param in model.named_parameters():
        if is_peft_module(name):
            noise = torch.randn(param.shape, generator=gen) * std
            if name.endswith(SCALE_LIKE):
                param.add_(noise)
            else:
                param.copy_(noise)


def batch(seed: int = 0, lengths=(7, 4, 6), vocab: int = 99):
    """Padded input_ids (pad 0), attention mask and labels for ``len(lengths)`` cells."""
    gen = torch.Generator().manual_seed(seed)
    n, width = len(lengths), max(lengths)
    ids = torch.zeros(n, width, dtype=torch.long)
    mask = torch.zeros(n, width, dtype=torch.long)
    for i, length in enumerate(lengths):
        ids[i, :length] = torch.randint(1, vocab, (length,), generator=gen)
        mask[i, :length] = 1
    labels = torch.arange(n) % TINY["num_labels"]
    return ids, mask, labels


def logits(model, ids, mask) -> torch.Tensor:
    with torch.no_grad():
        return model(ids, attention_mask=mask).logits


def set_prompts_attended(model, attend: bool) -> None:
    for module in model.modules():
        if hasattr(module, "attend"):
            module.attend = attend
