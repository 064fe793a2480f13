"""Factories of the scBERT (Performer) tests: tiny configs, performer-pytorch references built
with scBERT's settings, and ``.pth`` files in the released layout."""
from __future__ import annotations

from pathlib import Path

import torch

import transformerslocal as tl
from transformerslocal.modeling_performer import from_performer_pytorch_state_dict

#: tiny sizes (fast tests); dim_head 8 -> nb_features int(8 ln 8) = 16
TINY = dict(num_tokens=7, max_seq_len=37, dim=32, depth=2, heads=4, dim_head=8)
#: the released layer shape (dim 200, 10 heads of 64, 6 layers, 266 random features) on a short panel
RELEASED_LAYERS = dict(num_tokens=7, max_seq_len=61, dim=200, depth=6, heads=10, dim_head=64)
#: scBERT's PerformerLM settings (its finetune.py / pretrain.py; performer-pytorch 1.1.4 names)
SCBERT_PP_KWARGS = dict(local_attn_heads=0, rotary_position_emb=False, qkv_bias=False, attn_out_bias=True)


def perturb_(model: torch.nn.Module, seed: int = 0, scale: float = 0.1) -> torch.nn.Module:
    """Add noise to every float parameter (LayerNorms and biases leave 1 / 0)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * scale)
    return model


def reference_lm(sizes: dict = TINY, *, seed: int = 0, scale: float = 0.1, **kwargs):
    """performer-pytorch's ``PerformerLM`` with scBERT's settings, random and perturbed by
    ``scale`` (0.02 keeps a dim-200, 6-layer stack at trained-model magnitudes), eval mode."""
    import performer_pytorch

    torch.manual_seed(seed)
    model = performer_pytorch.PerformerLM(**sizes, **{**SCBERT_PP_KWARGS, **kwargs})
    return perturb_(model, seed, scale).eval()


def ours_from_reference(reference, cls=tl.PerformerForMaskedLM, **config):
    """Our model holding ``reference``'s weights and projection matrices, eval mode."""
    sizes = {k: v for k, v in config.items()}
    model = cls(tl.PerformerConfig(**sizes), warn_random_positions=False)
    model.load_state_dict(from_performer_pytorch_state_dict(reference.state_dict()), strict=True)
    return model.eval()


def released_state_dict(reference) -> dict[str, torch.Tensor]:
    """``reference``'s state dict in the scBERT release's layout: no ``proj_updater`` copies,
    the counter as ``performer.calls_since_last_redraw``, the gene2vec table in float64 (the
    release builds it with ``torch.from_numpy`` of a float64 array)."""
    state = {}
    for key, tensor in reference.state_dict().items():
        if key.startswith("performer.proj_updater.instance."):
            continue
        if key == "performer.proj_updater.calls_since_last_redraw":
            key = "performer.calls_since_last_redraw"
        state[key] = tensor.clone()
    state["pos_emb.emb.weight"] = state["pos_emb.emb.weight"].double()
    state["pos_emb.emb.weight"][-1] = 0.0  # the release appends a zero row for the extra position
    return state


def write_released_pth(path: Path, state: dict[str, torch.Tensor]) -> Path:
    """A ``.pth`` as scBERT's scripts save it."""
    torch.save({"epoch": 3, "model_state_dict": state, "optimizer_state_dict": {"state": {}, "param_groups": []},
                "losses": 1.25}, path)
    return path


def tokens(batch: int, length: int, num_tokens: int = 7, seed: int = 0) -> torch.Tensor:
    """Random binned cells (bins 0..num_tokens-2) with the extra position 0."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, num_tokens - 1, (batch, length), generator=gen)
    ids[:, -1] = 0
    return ids
