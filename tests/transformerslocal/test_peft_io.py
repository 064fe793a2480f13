"""PEFT weights on disk: ``save_peft_weights`` writes the trainable part alone, and
``load_peft_model`` on the base checkpoint reproduces the trained model exactly."""
from __future__ import annotations

import re

import pytest
import torch
from safetensors.torch import load_file

from peft_cases import CASE_PARAMS, Case, base_model, batch, from_base, logits, perturb_peft, tiny_config
from transformerslocal import (
    BertForMaskedLM,
    BertForSequenceClassification,
    load_peft_model,
    load_peft_weights,
    mark_trainable,
    save_peft_weights,
)
from transformerslocal.peft import PEFT_WEIGHTS_NAME


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    """A "pretrained" plain BERT checkpoint folder."""
    directory = tmp_path_factory.mktemp("base")
    base_model(seed=0).save_pretrained(directory)
    return directory


@torch.no_grad()
def trained(case: Case, base_dir):
    """The case's model on the base weights, with every trainable tensor moved (as if trained)."""
    # train mode: with lora_merge_weights an eval-mode (merged) layer must not have A, B edited
    model = BertForSequenceClassification.from_pretrained(base_dir, **case.overrides).train()
    mark_trainable(model)
    perturb_peft(model)
    gen = torch.Generator().manual_seed(5)
    for param in model.parameters():
        if param.requires_grad:
            param.add_(torch.randn(param.shape, generator=gen) * 0.01)
    return model.eval()


@pytest.mark.parametrize("case", CASE_PARAMS)
def test_save_and_load_peft_weights_round_trip(case: Case, base_dir, tmp_path):
    model = trained(case, base_dir)
    ids, mask, _ = batch()
    expected = logits(model, ids, mask)

    file = save_peft_weights(model, tmp_path / "peft")
    assert file.name == PEFT_WEIGHTS_NAME and (file.parent / "config.json").is_file()
    saved = load_file(str(file))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert set(saved) == trainable
    if case.methods:  # small: the methods and the head only
        full_size = (base_dir / "model.safetensors").stat().st_size
        assert file.stat().st_size < full_size / 2
        assert all(not k.startswith("bert.embeddings.") and not k.endswith("query.weight") for k in saved)

    loaded = load_peft_model(base_dir, tmp_path / "peft")
    assert loaded.config.peft_methods == case.config().peft_methods
    assert torch.equal(logits(loaded, ids, mask), expected)


def test_load_peft_model_on_a_masked_lm_base(tmp_path):
    """Geneformer checkpoints are BertForMaskedLM: no pooler, an MLM head to drop."""
    torch.manual_seed(0)
    mlm = BertForMaskedLM(tiny_config())
    mlm.save_pretrained(tmp_path / "base")
    model = BertForSequenceClassification.from_pretrained(tmp_path / "base", prompt_type="lora,prefix_prompt")
    mark_trainable(model)
    perturb_peft(model)
    with torch.no_grad():
        model.bert.pooler.dense.weight.mul_(3.0)
    model.eval()
    ids, mask, _ = batch()
    save_peft_weights(model, tmp_path / "peft")
    loaded = load_peft_model(tmp_path / "base", tmp_path / "peft")
    assert torch.equal(logits(loaded, ids, mask), logits(model, ids, mask))


def test_peft_weights_of_another_prompt_type_raise(base_dir, tmp_path):
    model = trained(Case("lora", dict(prompt_type="lora"), ("lora",)), base_dir)
    save_peft_weights(model, tmp_path / "lora")
    # a model without LoRA has no place for lora_A / lora_B
    with pytest.raises(ValueError, match=r"lora_A|lora_B") as err:
        load_peft_model(base_dir, tmp_path / "lora", prompt_type="prefix_prompt")
    assert "prompt_type" in str(err.value)
    other = BertForSequenceClassification.from_pretrained(base_dir, prompt_type="Gene_token_prompt")
    with pytest.raises(ValueError, match=re.escape("attention.self.query.lora_A")):
        load_peft_weights(other, tmp_path / "lora")


def test_peft_weights_missing_a_method_raise(base_dir, tmp_path):
    """A file saved with fewer methods than the model has would leave modules at their
    start (LoRA B = 0): silently not the trained model."""
    model = trained(Case("lora", dict(prompt_type="lora"), ("lora",)), base_dir)
    save_peft_weights(model, tmp_path / "lora")
    with pytest.raises(ValueError, match=r"prompt_embeddings"):
        load_peft_model(base_dir, tmp_path / "lora", prompt_type="lora,prefix_prompt")


def test_missing_peft_file_raises(tmp_path):
    model = BertForSequenceClassification(tiny_config(prompt_type="lora"))
    with pytest.raises(FileNotFoundError, match=PEFT_WEIGHTS_NAME):
        load_peft_weights(model, tmp_path)


def test_peft_weights_saved_from_a_merged_model_are_unmerged(base_dir, tmp_path):
    model = trained(Case("lora", dict(prompt_type="lora", lora_merge_weights=True), ("lora",)), base_dir)
    ids, mask, _ = batch()
    expected = logits(model.eval(), ids, mask)  # eval(): merged
    save_peft_weights(model, tmp_path / "peft")
    loaded = load_peft_model(base_dir, tmp_path / "peft")
    torch.testing.assert_close(logits(loaded, ids, mask), expected, rtol=0, atol=1e-6)
