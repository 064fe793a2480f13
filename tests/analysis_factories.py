"""Tiny vocabularies, tokenized cells and checkpoints for the analysis tests (tests/analysis).

Cells hold distinct gene tokens of variable length (V1: genes only; V2: ``<cls>`` genes
``<eos>``); checkpoints are ``transformers`` models of the tiny test sizes (the reference)
saved with the vocabulary, loaded by the analyses as pretrained checkpoints.
"""
from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np

from bert_factories import TINY_CONFIG, hf_tiny_model, save_hf

N_GENES = 95  # tokens 4..98 of the 99-token tiny vocabulary
LABELS = ("A", "B", "C")


def gene_id(i: int) -> str:
    return f"ENSGTEST{i:07d}"


def token_dictionary() -> dict[str, int]:
    """``<pad>`` 0, ``<mask>`` 1, ``<cls>`` 2, ``<eos>`` 3, then 95 genes: 99 tokens (TINY_CONFIG)."""
    vocab = {"<pad>": 0, "<mask>": 1, "<cls>": 2, "<eos>": 3}
    vocab.update({gene_id(i): 4 + i for i in range(N_GENES)})
    assert len(vocab) == TINY_CONFIG["vocab_size"]
    return vocab


def v1_token_dictionary() -> dict[str, int]:
    """The same genes without ``<cls>`` / ``<eos>`` (ids unchanged)."""
    return {k: v for k, v in token_dictionary().items() if k not in ("<cls>", "<eos>")}


def make_cells(n_cells: int = 9, *, v2: bool = False, seed: int = 0, min_genes: int = 5, max_genes: int = 30,
               always: tuple[int, ...] = ()):
    """A ``datasets.Dataset`` of ``n_cells`` tokenized cells of random lengths.

    Columns ``input_ids`` (distinct gene tokens, V2 framed by ``<cls>``/``<eos>``), ``length``,
    ``cell_type`` (cycling A, B, C), ``batch`` and ``n_counts``. Tokens in ``always`` are in
    every cell (at random ranks).
    """
    import datasets

    rng = np.random.default_rng(seed)
    rows = []
    for _ in range(n_cells):
        n = int(rng.integers(min_genes, max_genes + 1))
        others = np.array([t for t in range(4, 4 + N_GENES) if t not in always])
        genes = list(rng.choice(others, size=n - len(always), replace=False)) + list(always)
        rng.shuffle(genes)
        tokens = ([2] if v2 else []) + [int(g) for g in genes] + ([3] if v2 else [])
        rows.append(tokens)
    return datasets.Dataset.from_dict({
        "input_ids": rows, "length": [len(r) for r in rows],
        "cell_type": [LABELS[i % len(LABELS)] for i in range(n_cells)],
        "batch": [f"b{i % 2}" for i in range(n_cells)],
        "n_counts": [float(100 + i) for i in range(n_cells)],
    })


def save_cells(dataset, path: Path) -> Path:
    dataset.save_to_disk(str(path))
    return path


def hf_checkpoint(directory: Path, *, seed: int = 0, v2: bool = True):
    """A perturbed ``transformers.BertForMaskedLM`` of the tiny sizes saved in ``directory`` with
    ``token_dictionary.pkl``; returns the HF model (the reference)."""
    hf = hf_tiny_model("BertForMaskedLM", seed=seed)
    save_hf(hf, directory, "safetensors")
    with open(Path(directory) / "token_dictionary.pkl", "wb") as fh:
        pickle.dump(token_dictionary() if v2 else v1_token_dictionary(), fh)
    return hf
