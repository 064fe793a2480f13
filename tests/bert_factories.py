"""Tiny BERT builders shared by the model tests.

Sizes follow the HuggingFace BERT tests (vocab 99, hidden 32, 2 layers, 4 heads,
intermediate 37): odd, mutually distinct sizes so that a transposed weight or a swapped
head dimension fails loudly instead of broadcasting. ``transformers`` is imported lazily,
only by the helpers that build reference models, so test modules that do not need it
still import this one.
"""
from __future__ import annotations

from pathlib import Path

import torch

import transformerslocal as tl

TINY_CONFIG = {
    "vocab_size": 99,
    "hidden_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "intermediate_size": 37,
    "hidden_act": "relu",
    "hidden_dropout_prob": 0.0,
    "attention_probs_dropout_prob": 0.0,
    "max_position_embeddings": 64,
    "type_vocab_size": 2,
    "initializer_range": 0.02,
    "layer_norm_eps": 1e-12,
    "pad_token_id": 0,
}

# Geneformer V1 6-layer shapes (docs/peft_keys.md §9).
GENEFORMER_V1_6L = {
    "vocab_size": 25426,
    "hidden_size": 256,
    "num_hidden_layers": 6,
    "num_attention_heads": 4,
    "intermediate_size": 512,
    "hidden_act": "relu",
    "hidden_dropout_prob": 0.02,
    "attention_probs_dropout_prob": 0.02,
    "max_position_embeddings": 2048,
    "type_vocab_size": 2,
    "initializer_range": 0.02,
    "layer_norm_eps": 1e-12,
    "pad_token_id": 0,
}

# The model classes of each library under the same name.
HEADS = ("BertModel", "BertForMaskedLM", "BertForSequenceClassification", "BertForTokenClassification")


def tiny_config_kwargs(**overrides) -> dict:
    """Keys of the tiny config, with ``overrides`` applied."""
    return {**TINY_CONFIG, **overrides}


def tiny_config(**overrides) -> tl.BertConfig:
    """Our :class:`~transformerslocal.BertConfig` at the tiny sizes."""
    return tl.BertConfig(**tiny_config_kwargs(**overrides))


@torch.no_grad()
def perturb_(model: torch.nn.Module, seed: int = 0, scale: float = 0.1) -> torch.nn.Module:
    """Add N(0, scale) noise to every parameter, in place.

    A fresh BERT has zero biases and unit LayerNorm weights, which hide a swapped bias or
    LayerNorm; after this every parameter is distinct. Tied parameters are one tensor in
    ``parameters()`` and stay tied.
    """
    gen = torch.Generator().manual_seed(seed)
    for param in model.parameters():
        param.add_(torch.randn(param.shape, generator=gen, dtype=param.dtype) * scale)
    return model


def ours_tiny_model(cls_name: str, *, seed: int = 0, config: tl.BertConfig | None = None, **overrides):
    """One of our tiny models, seeded, perturbed, in eval mode."""
    torch.manual_seed(seed)
    model = getattr(tl, cls_name)(config if config is not None else tiny_config(**overrides))
    return perturb_(model, seed=seed).eval()


def hf_config(base: dict | None = None, **overrides):
    """A ``transformers.BertConfig`` (eager attention, so attentions can be returned)."""
    import transformers

    kwargs = {**(TINY_CONFIG if base is None else base), **overrides}
    return transformers.BertConfig(attn_implementation="eager", **kwargs)


def hf_tiny_model(cls_name: str, *, seed: int = 0, base: dict | None = None, perturb: bool = True, **overrides):
    """A ``transformers`` model (``cls_name`` e.g. ``"BertForMaskedLM"``), seeded, in eval mode."""
    import transformers

    torch.manual_seed(seed)
    model = getattr(transformers, cls_name)(hf_config(base, **overrides))
    if perturb:
        perturb_(model, seed=seed)
    return model.eval()


def save_hf_bin(model, directory: str | Path) -> Path:
    """What HF 4.x ``save_pretrained(safe_serialization=False)`` wrote: ``config.json`` and a
    ``pytorch_model.bin`` of the full state dict, tied ``cls.predictions.decoder.*`` included.
    (transformers 5 writes safetensors only.)"""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), directory / "pytorch_model.bin")
    model.config.save_pretrained(directory)
    return directory


def save_hf(model, directory: str | Path, fmt: str) -> Path:
    """Save a ``transformers`` model as ``"safetensors"`` (its own ``save_pretrained``) or ``"bin"``."""
    if fmt == "bin":
        return save_hf_bin(model, directory)
    if fmt != "safetensors":
        raise ValueError(f"fmt {fmt!r}; expected 'safetensors' or 'bin'")
    model.save_pretrained(directory)
    return Path(directory)


def padded_batch(vocab_size: int, lengths, seed: int = 0):
    """Right-padded ``(input_ids, attention_mask)`` of shape (len(lengths), max(lengths)).

    Real tokens are drawn from ``1..vocab_size-1``; padding is token 0 with mask 0.
    """
    gen = torch.Generator().manual_seed(seed)
    lengths = list(lengths)
    width = max(lengths)
    input_ids = torch.randint(1, vocab_size, (len(lengths), width), generator=gen)
    attention_mask = torch.zeros(len(lengths), width, dtype=torch.long)
    for row, n in enumerate(lengths):
        attention_mask[row, :n] = 1
    input_ids = input_ids.masked_fill(attention_mask == 0, 0)
    return input_ids, attention_mask
