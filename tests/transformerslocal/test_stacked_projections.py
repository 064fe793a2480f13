"""Inference computes query, key and value with one matmul against the stacked weights
(``BertSelfAttention._projections``): the same logits as three separate projections, for plain
BERT and for LoRA unmerged and merged; methods that change a projection otherwise (IA3, DoRA)
and every training or autograd pass keep the three modules."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from peft_cases import batch, build, perturb_peft, tiny_config
from transformerslocal import merge_lora

HIDDEN = tiny_config().hidden_size


@pytest.fixture
def linear_shapes(monkeypatch):
    """Record the weight shape of every ``F.linear`` call."""
    shapes = []
    linear = F.linear

    def spy(x, weight, bias=None):
        shapes.append(tuple(weight.shape))
        return linear(x, weight, bias)

    monkeypatch.setattr(F, "linear", spy)
    return shapes


def separate_logits(model, ids, mask) -> torch.Tensor:
    """Logits with autograd on, which keeps the three projections separate."""
    with torch.enable_grad():
        return model(ids, attention_mask=mask).logits.detach()


def stacked_logits(model, ids, mask) -> torch.Tensor:
    with torch.no_grad():
        return model(ids, attention_mask=mask).logits


def peft_model(prompt_type, **overrides):
    model = build(tiny_config(prompt_type=prompt_type, **overrides))
    perturb_peft(model, std=0.3)  # LoRA B != 0: the update must really be added to its slice
    return model.eval()


@pytest.mark.parametrize("prompt_type", [None, "lora", "Gene_token_prompt,lora", "prefix_prompt"])
def test_stacked_projections_give_the_separate_logits(prompt_type, linear_shapes):
    model = peft_model(prompt_type, lora_target_modules=["query", "key", "value"])
    ids, mask, _ = batch()
    expected = separate_logits(model, ids, mask)
    assert (3 * HIDDEN, HIDDEN) not in linear_shapes
    got = stacked_logits(model, ids, mask)
    n_layers = model.config.num_hidden_layers
    assert linear_shapes.count((3 * HIDDEN, HIDDEN)) == n_layers
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)


def test_merged_lora_is_stacked_too(linear_shapes):
    model = peft_model("lora")
    ids, mask, _ = batch()
    expected = stacked_logits(model, ids, mask)  # unmerged, LoRA added into the query and value slices
    linear_shapes.clear()
    merged = merge_lora(model).eval()
    got = stacked_logits(merged, ids, mask)
    assert linear_shapes.count((3 * HIDDEN, HIDDEN)) == merged.config.num_hidden_layers
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize("prompt_type", ["ia3", "dora"])
def test_methods_that_change_a_projection_keep_three(prompt_type, linear_shapes):
    model = peft_model(prompt_type)
    ids, mask, _ = batch()
    expected = separate_logits(model, ids, mask)
    got = stacked_logits(model, ids, mask)
    assert (3 * HIDDEN, HIDDEN) not in linear_shapes
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)


def test_training_mode_keeps_three_even_without_autograd(linear_shapes):
    model = peft_model("lora").train()
    ids, mask, _ = batch()
    with torch.no_grad():
        model(ids, attention_mask=mask)
    assert (3 * HIDDEN, HIDDEN) not in linear_shapes


def test_stacked_weights_follow_in_place_updates():
    """No stale copy: a weight changed in place (as an optimizer step or a merge does) is used."""
    model = peft_model("lora")
    ids, mask, _ = batch()
    before = stacked_logits(model, ids, mask)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for layer in model.bert.encoder.layer:
            projections = layer.attention.self
            # .data: an update that does not even bump the weight's version counter
            projections.value.weight.data.copy_(torch.randn(projections.value.weight.shape, generator=gen))
            projections.query.bias.add_(1.0)
    after = stacked_logits(model, ids, mask)
    assert (after - before).abs().max() > 1e-2
    torch.testing.assert_close(after, separate_logits(model, ids, mask), rtol=0, atol=1e-6)
