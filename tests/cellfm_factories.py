"""Factories of the CellFM tests: the released checkpoint's key set (from the names published
for the 80M release) at tiny sizes, and the reference files in ../shared/cellfm."""
from __future__ import annotations

from pathlib import Path

import numpy as np

SHARED_CELLFM = Path(__file__).resolve().parents[2] / "shared" / "cellfm"

#: tiny sizes with the release's head dim (32): 64 dims -> 2 heads
TINY_RELEASE = dict(vocab_size=24, hidden_size=64, num_hidden_layers=2, intermediate_size=64, value_slots=8)
#: the 80M release's shapes (never allocated by the tests)
RELEASE_80M = dict(vocab_size=27856, hidden_size=1536, num_hidden_layers=2, intermediate_size=1536, value_slots=256)


def encoder_shapes(vocab_size: int, hidden_size: int, num_hidden_layers: int, intermediate_size: int,
                   value_slots: int) -> dict[str, tuple[int, ...]]:
    """The encoder's released tags and shapes (LayerNorms as gamma / beta)."""
    d, inner = hidden_size, intermediate_size
    shapes: dict[str, tuple[int, ...]] = {
        "gene_emb": (vocab_size, d), "cls_token": (1, 1, d), "value_enc.mask_emb": (1, 1, d),
        "value_enc.value_enc.a": (1, 1), "value_enc.value_enc.w1.weight": (value_slots, 1),
        "value_enc.value_enc.w3.weight": (value_slots, value_slots),
        "value_enc.value_enc.table.weight": (d, value_slots),
    }
    for i in range(num_hidden_layers):
        for p in "qkvuo":
            shapes[f"encoder.{i}.attn.{p}_proj.weight"] = (d, d)
        shapes[f"encoder.{i}.ffn.u_proj.weight"] = (inner, d)
        shapes[f"encoder.{i}.ffn.v_proj.weight"] = (inner, d)
        shapes[f"encoder.{i}.ffn.o_proj.weight"] = (d, inner)
        for n in (1, 2):
            shapes[f"encoder.{i}.post_norm{n}.gamma"] = (d,)
            shapes[f"encoder.{i}.post_norm{n}.beta"] = (d,)
    return shapes


#: pretraining-only entries of the release (decoders, the spatial embedding), at tiny shapes
PRETRAINING_SHAPES = {"zero_emb": (1, 1, 64), "value_dec.w1.weight": (64, 64), "value_dec.w2.weight": (1, 64),
                      "cellwise_dec.map.weight": (64, 64), "ST_emb": (1, 1, 64), "ST_enc.w1.weight": (64, 1)}
#: training scalars MindSpore keeps in a checkpoint
SCALARS = {"global_step": np.array([1000], dtype=np.int32), "learning_rate": np.array(1e-4, dtype=np.float32),
           "beta1_power": np.array([0.9], dtype=np.float32), "beta2_power": np.array([0.99], dtype=np.float32)}


def released_tensors(sizes: dict = TINY_RELEASE, *, seed: int = 0, moments: bool = True,
                     pretraining: bool = True, scalars: bool = True) -> dict[str, np.ndarray]:
    """A released-layout checkpoint's tensors: small random values, optimizer moments of every
    parameter, the pretraining decoders and the scalars, in the release's order."""
    rng = np.random.default_rng(seed)
    shapes = encoder_shapes(**sizes)
    if pretraining:
        shapes.update(PRETRAINING_SHAPES)
    params = {k: (rng.standard_normal(s) * 0.1).astype(np.float32) for k, s in shapes.items()}
    out = dict(params)
    if moments:
        for name in ("moment1", "moment2"):
            out.update({f"{name}.{k}": np.zeros_like(v) for k, v in params.items()})
    if scalars:
        out.update(SCALARS)
    return out
