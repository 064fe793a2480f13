"""``finetune --quantize``: the job on a quantized frozen base (transformerslocal.peft.quantize)."""
from __future__ import annotations

import logging
import pickle
import sys

import numpy as np
import pytest
import torch

import job_factories as jf


@pytest.fixture(scope="module")
def nf4_run(job_data, tmp_path_factory):
    """Fold 0 of LoRA on an nf4 base: a checkpoint whose projections hold multiples of 64 weights."""
    pytest.importorskip("torchao", reason="the 'quant' extra (torchao) is not installed")
    root = tmp_path_factory.mktemp("quantize")
    model_path = jf.make_tiny_checkpoint(root / "ckpt", vocab_size=len(job_data.token_dictionary),
                                         max_position_embeddings=jf.MODEL_INPUT_SIZE, intermediate_size=48)
    argv = job_data.finetune_argv(root / "out", "--prompt_type", "lora", "--quantize", "nf4", "--folds", "0",
                                  "--baselines", "none")
    argv[argv.index("--model_path") + 1] = str(model_path)
    assert jf.run_finetune(argv) == 0
    return jf.run_dir(root / "out", "lora", job_data) / "0", model_path


def _probabilities(model, dataset) -> np.ndarray:
    model.eval()
    with torch.no_grad():
        return np.stack([torch.softmax(model(torch.tensor([ids]), torch.ones(1, len(ids), dtype=torch.long)).logits,
                                       dim=-1)[0].numpy() for ids in dataset["input_ids"]])


def test_quantized_run_writes_every_fold_file(nf4_run, finished_runs):
    fold_dir, _ = nf4_run
    plain = finished_runs("lora") / "0"
    baseline_files = {p.name for p in plain.iterdir() if p.name.startswith("baseline")}
    assert {p.name for p in fold_dir.iterdir()} == {p.name for p in plain.iterdir()} - baseline_files
    provenance = jf.read_json(fold_dir / "provenance.json")
    assert provenance["settings"]["training"]["quantize"] == "nf4"


def test_fold_model_reproduces_the_quantized_model_and_peft_weights_load_on_the_plain_base(nf4_run, job_data):
    from datasets import load_from_disk

    from geneformer_peft.models.loading import load_fold_model
    from transformerslocal.peft.quantize import is_quantized

    fold_dir, model_path = nf4_run
    test = load_from_disk(str(job_data.fold_file(0, "test")))
    saved = pickle.loads((fold_dir / "predictions.pickle").read_bytes())
    # the fold's full weights are the dequantized base plus LoRA: the function the run tested
    full = load_fold_model(fold_dir)
    np.testing.assert_allclose(_probabilities(full, test), saved["probabilities"], atol=1e-5)
    # the PEFT weights alone go onto the unquantized checkpoint
    on_base = load_fold_model(fold_dir, base_model=model_path)
    assert not any(is_quantized(p) for p in on_base.parameters())
    lora = "bert.encoder.layer.1.attention.self.value.lora_B"
    torch.testing.assert_close(on_base.get_parameter(lora), full.get_parameter(lora))
    assert on_base.get_parameter(lora).abs().sum() > 0  # trained
    probs = _probabilities(on_base, test)
    assert np.abs(probs - saved["probabilities"]).max() < 0.2  # only the quantization error apart


def test_quantize_refusals_before_training(job_data, tmp_path, caplog, monkeypatch):
    from transformerslocal.peft import quantize as q

    caplog.set_level(logging.ERROR)
    argv = job_data.finetune_argv(tmp_path, "--prompt_type", "", "--quantize", "nf4", "--folds", "0")
    assert jf.run_finetune(argv) == 2
    assert "needs a PEFT method" in caplog.text
    assert not (tmp_path / "full_finetune").exists()

    caplog.clear()
    monkeypatch.setattr(q, "_QUANTIZE", {})
    for name in ["torchao"] + [m for m in sys.modules if m.startswith("torchao.")]:
        monkeypatch.setitem(sys.modules, name, None)
    argv = job_data.finetune_argv(tmp_path, "--prompt_type", "lora", "--quantize", "int8", "--folds", "0")
    assert jf.run_finetune(argv) == 2
    assert "geneformer-peft[quant]" in caplog.text
    assert not (tmp_path / "lora").exists()
