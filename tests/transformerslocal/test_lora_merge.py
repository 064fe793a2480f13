"""LoRA merging: eval-mode merged weights equal the unmerged computation, a state dict taken
from a merged model never holds the update twice, ``merge_lora`` gives a plain BERT that
stock ``transformers`` loads, and the reference's ``lora_query`` key names load."""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from peft_cases import batch, build, logits, perturb_peft, tiny_config
from transformerslocal import BertForSequenceClassification, merge_lora
from transformerslocal.peft.lora import LoRALinear


def merging_model(seed: int = 0):
    model = build(tiny_config(prompt_type="lora", lora_merge_weights=True), seed)
    perturb_peft(model, std=0.3)  # B != 0, or merging would be a no-op
    return model


def lora_layers(model):
    return [m for m in model.modules() if isinstance(m, LoRALinear)]


def test_merged_eval_equals_unmerged_train():
    model = merging_model()
    ids, mask, _ = batch()
    unmerged = logits(model.train(), ids, mask)  # dropout 0 in the tiny config
    assert not any(layer.merged for layer in lora_layers(model))
    merged = logits(model.eval(), ids, mask)
    assert all(layer.merged for layer in lora_layers(model))
    torch.testing.assert_close(merged, unmerged, rtol=0, atol=1e-6)


def test_state_dict_of_merged_model_holds_unmerged_weights():
    model = merging_model()
    ids, mask, _ = batch()
    train_state = {k: v.clone() for k, v in model.train().state_dict().items()}
    expected = logits(model.eval(), ids, mask)
    eval_state = model.state_dict()  # taken while merged
    assert eval_state.keys() == train_state.keys()
    for key in train_state:
        torch.testing.assert_close(eval_state[key], train_state[key], rtol=0, atol=1e-6, msg=key)

    for start_mode in ("train", "eval"):  # loading into an unmerged and into a merged model
        fresh = build(tiny_config(prompt_type="lora", lora_merge_weights=True), seed=7)
        getattr(fresh, start_mode)()
        fresh.load_state_dict(eval_state)
        torch.testing.assert_close(logits(fresh.eval(), ids, mask), expected, rtol=0, atol=1e-6)
        torch.testing.assert_close(logits(fresh.train(), ids, mask), expected, rtol=0, atol=1e-6)


def test_repeated_mode_toggles_never_double_count():
    model = merging_model()
    ids, mask, _ = batch()
    expected = logits(model.eval(), ids, mask)
    first_state = {k: v.clone() for k, v in model.state_dict().items()}
    for _ in range(3):
        model.train()
        model.eval()
        model.eval()  # a second eval() must not merge again
        torch.testing.assert_close(logits(model, ids, mask), expected, rtol=0, atol=1e-6)
        model.train()
        torch.testing.assert_close(logits(model, ids, mask), expected, rtol=0, atol=1e-6)
    for key, value in model.eval().state_dict().items():
        torch.testing.assert_close(value, first_state[key], rtol=0, atol=1e-6, msg=key)
    # a round trip of the merged state through a fresh model, toggled again
    fresh = build(tiny_config(prompt_type="lora", lora_merge_weights=True), seed=3)
    fresh.load_state_dict(model.state_dict())
    for _ in range(2):
        fresh.train()
        fresh.eval()
    torch.testing.assert_close(logits(fresh, ids, mask), expected, rtol=0, atol=1e-6)


def test_merge_lora_loads_in_stock_transformers(tmp_path):
    transformers = pytest.importorskip("transformers", reason="stock transformers is the reference loader")
    model = merging_model().eval()
    ids, mask, _ = batch()
    expected = logits(model, ids, mask)
    merged = merge_lora(model).eval()
    assert not lora_layers(merged)
    assert not any("lora_" in k for k in merged.state_dict())
    torch.testing.assert_close(logits(merged, ids, mask), expected, rtol=0, atol=1e-6)
    merged.save_pretrained(tmp_path)
    hf = transformers.BertForSequenceClassification.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        got = hf(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)
    # and our own loader reads it back as a plain BERT
    ours = BertForSequenceClassification.from_pretrained(tmp_path)
    assert ours.config.peft_methods == ()
    torch.testing.assert_close(logits(ours, ids, mask), expected, rtol=0, atol=1e-6)


def test_merge_lora_keeps_other_methods():
    model = build(tiny_config(prompt_type="lora,Gene_token_prompt"))
    perturb_peft(model)
    ids, mask, _ = batch()
    merged = merge_lora(model.eval()).eval()
    assert merged.config.peft_methods == ("Gene_token_prompt",)
    torch.testing.assert_close(logits(merged, ids, mask), logits(model, ids, mask), rtol=0, atol=1e-6)


@pytest.mark.parametrize("prompt_type", ["", "Gene_token_prompt"])
def test_merge_lora_without_lora_raises(prompt_type):
    model = build(tiny_config(prompt_type=prompt_type))
    with pytest.raises(ValueError, match="lora"):
        merge_lora(model)


@pytest.mark.parametrize("rename_all", [False, True], ids=["lora_params", "whole_projection"])
def test_reference_lora_key_names_load(tmp_path, rename_all):
    model = build(tiny_config(prompt_type="lora"))
    perturb_peft(model)
    model.eval()
    ids, mask, _ = batch()
    expected = logits(model, ids, mask)
    state = {}
    for key, value in model.state_dict().items():
        for proj in ("query", "value"):
            marker = f".attention.self.{proj}."
            if marker in key and (rename_all or ".lora_" in key):
                key = key.replace(marker, f".attention.self.lora_{proj}.")
        state[key] = value.contiguous()
    assert any(".attention.self.lora_query.lora_A" in k for k in state)
    save_file(state, str(tmp_path / "model.safetensors"))
    model.config.save_pretrained(tmp_path)
    loaded = BertForSequenceClassification.from_pretrained(tmp_path)
    assert loaded.loading_info["missing_keys"] == []
    assert torch.equal(logits(loaded, ids, mask), expected)


@pytest.mark.parametrize("shape", [(5, 32), (3, 7, 32)])
@pytest.mark.parametrize("dropout", [0.0, 0.5])
def test_lora_forward_equals_loralib_formula_and_gradients(shape, dropout):
    """Our in-place accumulation of the low-rank product gives loralib's output and the same
    gradients for x, W, b, A and B (dropout masks drawn alike through the same seed)."""
    torch.manual_seed(0)
    layer = LoRALinear(32, 24, r=4, lora_alpha=8, lora_dropout=dropout, merge_weights=False)
    layer.train()  # loralib's train() returns None
    layer.weight.requires_grad_(True)  # as in full fine-tuning + LoRA (loralib freezes it)
    with torch.no_grad():
        layer.lora_B.normal_()
    x = torch.randn(*shape, requires_grad=True)
    grads = {}
    for name, forward in (("ours", layer.forward), ("loralib", lambda t: super(LoRALinear, layer).forward(t))):
        torch.manual_seed(1)
        out = forward(x)
        (out * torch.arange(out.numel()).view_as(out).sin()).sum().backward()
        grads[name] = [out.detach()] + [t.grad.clone() for t in (x, layer.weight, layer.bias, layer.lora_A,
                                                                   layer.lora_B)]
        for t in (x, layer.weight, layer.bias, layer.lora_A, layer.lora_B):
            t.grad = None
    for ours, ref in zip(grads["ours"], grads["loralib"]):
        torch.testing.assert_close(ours, ref, rtol=1e-6, atol=1e-6)


def test_lora_forward_under_bf16_autocast():
    torch.manual_seed(0)
    layer = LoRALinear(32, 24, r=4, lora_alpha=8, merge_weights=False)
    layer.eval()
    with torch.no_grad():
        layer.lora_B.normal_()
    x = torch.randn(3, 7, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = layer(x)
    assert out.dtype == torch.bfloat16
    expected = torch.nn.functional.linear(x, layer.weight + layer.delta_weight(), layer.bias)
    torch.testing.assert_close(out.float(), expected, rtol=0.05, atol=0.05)
