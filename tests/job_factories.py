"""Tiny inputs for the fine-tuning job tests: a synthetic dataset in the reference fold
layout (docs/fold_layout.md) and a tiny random checkpoint over its vocabulary.

Everything is built with the project's own tools (``generate_counts`` -> ``build_vocabulary``
-> ``tokenize_anndata`` -> ``split_folds``), once per test session (see ``conftest.py``).
"""
from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "example_py" / "cell_classification_prompt_fold.py"
SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"

DATASET = "tiny"
LABEL_COLUMN = "cell_type"
MODEL_INPUT_SIZE = 64
#: flags every job test passes: short, quiet runs
FAST_FLAGS = ["--epoch", "2", "--batch_size", "16", "--no_progress", "--lr", "3e-3", "--device", "cpu"]

#: metrics.json keys that measure time, not results (excluded from determinism checks)
TIMING_KEYS = ("train_seconds", "train_cells_per_second", "test_cells_per_second")

#: the tiny checkpoint's sizes: odd, distinct sizes (HF BERT test convention)
TINY_SIZES = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 37}


@dataclass(frozen=True)
class JobData:
    """Where the session's tiny inputs live."""

    data_path: Path          # <data_path>/<DATASET>/<i>/<DATASET>_{train,val,test}<i>.dataset
    dataset_name: str
    cells: Path              # all tokenized cells (one saved dataset)
    model_path: Path         # tiny random BertForMaskedLM checkpoint
    token_dictionary: dict = field(repr=False)
    n_folds: int
    labels: tuple

    def fold_file(self, fold: int, split: str) -> Path:
        return self.data_path / self.dataset_name / str(fold) / f"{self.dataset_name}_{split}{fold}.dataset"

    def finetune_argv(self, output: Path, *extra: str) -> list[str]:
        """Options of ``geneformer-peft finetune`` / the example script for this data."""
        return ["--dataset_name", self.dataset_name, "--data_path", str(self.data_path),
                "--model_path", str(self.model_path), "--output_path", str(output), *FAST_FLAGS, *extra]


def make_job_data(root: Path, *, n_cells: int = 100, n_genes: int = 200, n_folds: int = 2, seed: int = 0) -> JobData:
    """Generate, tokenize and split a tiny labelled dataset, and save a tiny checkpoint."""
    from geneformer_peft.data.folds import split_folds
    from geneformer_peft.data.synthetic import generate_counts
    from geneformer_peft.data.rank_value import tokenize_anndata
    from geneformer_peft.data.vocab import build_vocabulary

    root = Path(root)
    adata = generate_counts(n_cells=n_cells, n_genes=n_genes, n_cell_types=3, seed=seed,
                            class_proportions=[0.4, 0.35, 0.25])
    token_dictionary, medians = build_vocabulary(adata, show_progress=False)
    cells = tokenize_anndata(adata, token_dictionary=token_dictionary, gene_median_dictionary=medians,
                             label_column=LABEL_COLUMN, model_input_size=MODEL_INPUT_SIZE, show_progress=False)
    cells_path = root / "cells.dataset"
    cells.save_to_disk(str(cells_path))
    data_path = root / "folds"
    split_folds(cells, dataset_name=DATASET, output_dir=data_path, n_folds=n_folds, label_column=LABEL_COLUMN,
                seed=seed, val_fraction=0.2)
    model_path = make_tiny_checkpoint(root / "ckpt", vocab_size=len(token_dictionary),
                                      max_position_embeddings=MODEL_INPUT_SIZE, seed=seed)
    labels = tuple(sorted({str(v) for v in cells[LABEL_COLUMN]}))
    return JobData(data_path=data_path, dataset_name=DATASET, cells=cells_path, model_path=model_path,
                   token_dictionary=dict(token_dictionary), n_folds=n_folds, labels=labels)


def make_tiny_checkpoint(directory: Path, *, vocab_size: int, max_position_embeddings: int = 64, seed: int = 0,
                         **overrides) -> Path:
    """A random ``BertForMaskedLM`` at the tiny sizes, saved with ``save_pretrained``."""
    from transformerslocal import BertConfig, BertForMaskedLM

    torch.manual_seed(seed)
    config = BertConfig(vocab_size=vocab_size, max_position_embeddings=max_position_embeddings,
                        **{**TINY_SIZES, **overrides})
    BertForMaskedLM(config).save_pretrained(directory)
    return Path(directory)


# ----------------------------------------------------------------------------- runs


def run_finetune(argv: list[str]) -> int:
    """``geneformer-peft finetune ARGV`` in this process; returns the exit status."""
    from geneformer_peft.cli import main

    return main(["finetune", *argv])


def run_script(argv: list[str], *, cwd: Path | None = None, timeout: float = 300):
    """The example script in a subprocess (as a user runs it); returns ``CompletedProcess``."""
    import subprocess

    return subprocess.run([sys.executable, str(SCRIPT), *argv], cwd=cwd or ROOT, capture_output=True, text=True,
                          timeout=timeout, env=_subprocess_env())


def _subprocess_env() -> dict:
    import os

    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", "1")
    env.setdefault("MKL_NUM_THREADS", "1")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    return env


def method_dir_name(prompt_type: str) -> str:
    return "_".join(p for p in prompt_type.split(",") if p) or "full_finetune"


def run_dir(output: Path, prompt_type: str, data: JobData, out_prefix: str = "") -> Path:
    return Path(output) / f"{out_prefix}{method_dir_name(prompt_type)}" / data.dataset_name


def read_json(path: Path):
    return json.loads(Path(path).read_text(encoding="utf-8"))


def result_metrics(metrics: dict) -> dict:
    """metrics.json without its timing fields."""
    return {k: v for k, v in metrics.items() if k not in TIMING_KEYS}


def probability_columns(frame, labels) -> list[str]:
    return [f"prob_{name}" for name in labels]


def assert_probabilities(frame, labels) -> np.ndarray:
    probs = frame[probability_columns(frame, labels)].to_numpy()
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(frame["confidence"].to_numpy(), probs.max(axis=1), atol=1e-6)
    return probs


# ----------------------------------------------------------------------------- altered copies


def copy_job_data(data: JobData, root: Path) -> JobData:
    """A copy of ``data``'s folds (the checkpoint is shared) that a test may alter."""
    import shutil
    from dataclasses import replace

    shutil.copytree(data.data_path, Path(root) / "folds")
    return replace(data, data_path=Path(root) / "folds")


def rewrite_split(data: JobData, fold: int, split: str, change) -> Path:
    """Replace one saved split by ``change(columns)``: ``columns`` is the split as a dict of
    lists, altered in place or returned anew (``datasets.Dataset.from_dict`` of the result)."""
    import datasets

    from geneformer_peft.data.dataset_io import save_dataset_atomically

    path = data.fold_file(fold, split)
    columns = datasets.load_from_disk(str(path)).to_dict()
    columns = change(columns) or columns
    save_dataset_atomically(datasets.Dataset.from_dict(columns), path)
    return path


def private_tmpfs_works() -> bool:
    """Whether this machine lets a process mount a tmpfs in a private mount namespace (``unshare
    -rm``): the full-disk and read-only fault tests need it and skip otherwise."""
    import shutil
    import subprocess
    import tempfile

    if shutil.which("unshare") is None:
        return False
    with tempfile.TemporaryDirectory() as probe:
        try:
            return subprocess.run(["unshare", "-rm", "sh", "-c", f"mount -t tmpfs -o size=64k tmpfs {probe}"],
                                  capture_output=True, timeout=30).returncode == 0
        except (OSError, subprocess.SubprocessError):
            return False
