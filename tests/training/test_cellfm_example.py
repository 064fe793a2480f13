"""The shipped CellFM example (``example_py/make_example.py --only cellfm``): the tiny pretrained
checkpoint and the CellFM folds load, the folds hold the same cells as the rank-value folds and
record their encoding, and one short fine-tuning epoch on fold 0 runs through the job."""
from __future__ import annotations

import json
from pathlib import Path

from datasets import load_from_disk

import job_factories as jf
import transformerslocal as tl
from geneformer_peft.cli import main
from geneformer_peft.data.cellfm import vocabulary_fingerprint
from geneformer_peft.data.vocab import load_token_dictionary

ROOT = Path(__file__).resolve().parents[2]
CKPT = ROOT / "Pretrain_ckpts" / "cellfm-tiny-example"
DATA = ROOT / "example_py" / "data"


def _split(name: str, fold: int, split: str):
    return load_from_disk(str(DATA / name / str(fold) / f"{name}_{split}{fold}.dataset"))


def test_shipped_cellfm_checkpoint_and_folds_load_and_fine_tune(tmp_path):
    config = json.loads((CKPT / "config.json").read_text())
    assert config["model_type"] == "cellfm" and config["prompt_type"] == "lora"
    model = tl.CellFMForMaskedValues.from_pretrained(CKPT)
    # prompt_type "lora" in config.json: only the (fresh) LoRA factors are not in the pretrained weights
    assert all(".lora_" in k for k in model.loading_info["missing_keys"])
    assert model.config.vocab_size % 8 == 0 and model.config.max_genes == 256
    vocabulary = vocabulary_fingerprint(load_token_dictionary(CKPT / "tokenizer.json"))
    for split in ("train", "val", "test"):  # the same cells as the Geneformer folds (fold 0)
        cells, rank = _split("synthetic_cellfm", 0, split), _split("synthetic", 0, split)
        assert cells["cell_type"] == rank["cell_type"]
        info = json.loads(cells.info.description)
        assert info["encoding"] == "cellfm" and info["vocabulary_sha1"] == vocabulary  # the checkpoint's own
        assert max(cells["length"]) <= 256 and [len(v) for v in cells["values"]] == cells["length"]
    out = tmp_path / "out"
    assert main(["finetune", "--dataset_name", "synthetic_cellfm", "--data_path", str(DATA), "--model_path",
                 str(CKPT), "--output_path", str(out), "--epoch", "1", "--folds", "0", "--batch_size", "32",
                 "--no_progress", "--device", "cpu"]) == 0
    metrics = jf.read_json(out / "lora" / "synthetic_cellfm" / "0" / "metrics.json")
    assert metrics["prompt_type"] == "lora" and 0 < metrics["trainable_parameters"] < metrics["total_parameters"]
    assert 0.0 <= jf.result_metrics(metrics)["macro_f1"] <= 1.0
