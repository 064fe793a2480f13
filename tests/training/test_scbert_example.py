"""The shipped scBERT example (``example_py/make_example.py --only scbert``): the tiny pretrained
checkpoint and the binned folds load, the folds hold the same cells as the rank-value folds, and
one short fine-tuning epoch on fold 0 runs through the job."""
from __future__ import annotations

import json
from pathlib import Path

from datasets import load_from_disk

import job_factories as jf
import transformerslocal as tl
from geneformer_peft.cli import main

ROOT = Path(__file__).resolve().parents[2]
CKPT = ROOT / "Pretrain_ckpts" / "scbert-tiny-example"
DATA = ROOT / "example_py" / "data"


def _split(name: str, fold: int, split: str):
    return load_from_disk(str(DATA / name / str(fold) / f"{name}_{split}{fold}.dataset"))


def test_shipped_scbert_checkpoint_and_folds_load_and_fine_tune(tmp_path):
    config = json.loads((CKPT / "config.json").read_text())
    assert config["model_type"] == "scbert" and config["prompt_type"] == "lora"
    model = tl.PerformerForMaskedLM.from_pretrained(CKPT)
    # prompt_type "lora" in config.json: only the (fresh) LoRA factors are not in the pretrained weights
    missing = model.loading_info["missing_keys"]
    assert all(".lora_" in k for k in missing) and model.config.depth == 2 and model.config.dim == 32
    panel = (CKPT / "gene_panel.txt").read_text().split()
    assert len(panel) + 1 == model.config.max_seq_len
    assert (DATA / "synthetic_binned" / "gene_panel.txt").read_text().split() == panel
    for split in ("train", "val", "test"):  # the same cells as the Geneformer folds (fold 0)
        binned, rank = _split("synthetic_binned", 0, split), _split("synthetic", 0, split)
        assert binned["cell_type"] == rank["cell_type"]
        assert set(binned["length"]) == {model.config.max_seq_len}
    out = tmp_path / "out"
    assert main(["finetune", "--dataset_name", "synthetic_binned", "--data_path", str(DATA), "--model_path",
                 str(CKPT), "--output_path", str(out), "--epoch", "1", "--folds", "0", "--batch_size", "32",
                 "--no_progress", "--device", "cpu"]) == 0
    metrics = jf.read_json(out / "lora" / "synthetic_binned" / "0" / "metrics.json")
    assert metrics["prompt_type"] == "lora" and 0 < metrics["trainable_parameters"] < metrics["total_parameters"]
    assert 0.0 <= jf.result_metrics(metrics)["macro_f1"] <= 1.0
