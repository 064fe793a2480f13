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


# ----------------------------------------------------------------------------- the job on CellFM
#: the job tests' tiny CellFM: 32 dims, 2 layers, 4 heads (the vocabulary is the data's)
JOB_SIZES = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=24, value_slots=16)
#: genes per cell the job tests tokenize (and the model's max_genes)
JOB_MAX_GENES = 48


def make_cellfm_job_data(root: Path, *, n_cells: int = 90, n_genes: int = 200, n_folds: int = 2, seed: int = 0):
    """The job tests' data, CellFM-encoded: synthetic counts -> ``tokenize_cellfm`` with a
    vocabulary built from them -> folds; and a tiny random ``CellFMForMaskedValues`` checkpoint
    over that vocabulary (with its ``tokenizer.json``). Returns a ``job_factories.JobData``."""
    import torch
    from job_factories import DATASET, LABEL_COLUMN, JobData

    import transformerslocal as tl
    from geneformer_peft.data.cellfm import tokenize_cellfm
    from geneformer_peft.data.folds import split_folds
    from geneformer_peft.data.synthetic import generate_counts
    from geneformer_peft.data.vocab import build_vocabulary, save_tokenizer_json

    root = Path(root)
    adata = generate_counts(n_cells=n_cells, n_genes=n_genes, n_cell_types=3, seed=seed,
                            class_proportions=[0.4, 0.35, 0.25])
    token_dictionary, _ = build_vocabulary(adata, show_progress=False)
    cells = tokenize_cellfm(adata, token_dictionary=token_dictionary, label_column=LABEL_COLUMN,
                            max_genes=JOB_MAX_GENES, show_progress=False)
    cells_path = root / "cells.dataset"
    cells.save_to_disk(str(cells_path))
    data_path = root / "folds"
    split_folds(cells, dataset_name=DATASET, output_dir=data_path, n_folds=n_folds, label_column=LABEL_COLUMN,
                seed=seed, val_fraction=0.2)
    torch.manual_seed(seed)
    config = tl.CellFMConfig(vocab_size=len(token_dictionary), max_genes=JOB_MAX_GENES, **JOB_SIZES)
    model_path = root / "cellfm_ckpt"
    tl.CellFMForMaskedValues(config).save_pretrained(model_path)
    save_tokenizer_json(token_dictionary, model_path)
    labels = tuple(sorted({str(v) for v in cells[LABEL_COLUMN]}))
    return JobData(data_path=data_path, dataset_name=DATASET, cells=cells_path, model_path=model_path,
                   token_dictionary=dict(token_dictionary), n_folds=n_folds, labels=labels)
