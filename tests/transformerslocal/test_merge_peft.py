"""Merging every mergeable method (docs/peft_keys.md §6): the merged model computes what the
unmerged one does, has none of the merged method's keys, keeps the other methods, and with
mergeable methods alone loads in stock ``transformers`` as a plain BERT."""
from __future__ import annotations

import pytest
import torch

from peft_cases import PEFT_CASE_PARAMS, Case, batch, build, logits, perturb_peft, tiny_config
from transformerslocal import BertForSequenceClassification, merge_lora, merge_peft
from transformerslocal.peft import REGISTRY

MERGEABLE = {name for name, method in REGISTRY.items() if method.mergeable}


def test_mergeable_methods():
    assert MERGEABLE == {"lora", "ia3", "dora"}


@pytest.mark.parametrize("case", [c for c in PEFT_CASE_PARAMS if set(c.values[0].methods) & MERGEABLE])
def test_merged_equals_unmerged(case: Case):
    model = build(case.config())
    perturb_peft(model, std=0.3)
    model.eval()
    ids, mask, _ = batch()
    merged = merge_peft(model).eval()
    kept = tuple(m for m in case.methods if m not in MERGEABLE)
    assert merged.config.peft_methods == kept
    for name in set(case.methods) & MERGEABLE:
        assert not any(REGISTRY[name].owns(k) for k in merged.state_dict()), name
    torch.testing.assert_close(logits(merged, ids, mask), logits(model, ids, mask), rtol=0, atol=1e-6)


@pytest.mark.parametrize("prompt_type, extra", [
    ("dora", dict(lora_r=4, lora_alpha=8, lora_target_modules=["query", "key", "value"])),
    ("ia3", dict()),
    ("dora,ia3", dict(lora_target_modules=["query"])),
])
def test_merged_model_loads_in_stock_transformers(tmp_path, prompt_type, extra):
    transformers = pytest.importorskip("transformers", reason="stock transformers is the reference loader")
    model = build(tiny_config(prompt_type=prompt_type, **extra))
    perturb_peft(model, std=0.3)
    model.eval()
    ids, mask, _ = batch()
    expected = logits(model, ids, mask)
    merged = merge_peft(model, prompt_type.split(",")).eval()
    assert merged.config.peft_methods == ()
    assert all(type(m) is torch.nn.Linear for n, m in merged.named_modules() if n.endswith((".key", ".value")))
    merged.save_pretrained(tmp_path)
    hf = transformers.BertForSequenceClassification.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        got = hf(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)
    ours = BertForSequenceClassification.from_pretrained(tmp_path)
    torch.testing.assert_close(logits(ours, ids, mask), expected, rtol=0, atol=1e-6)


def test_merge_one_method_keeps_the_other():
    model = build(tiny_config(prompt_type="lora,ia3", ia3_target_modules=["key"], ia3_feedforward_modules=[]))
    perturb_peft(model)
    model.eval()
    ids, mask, _ = batch()
    only_ia3 = merge_peft(model, "ia3").eval()
    assert only_ia3.config.peft_methods == ("lora",)
    torch.testing.assert_close(logits(only_ia3, ids, mask), logits(model, ids, mask), rtol=0, atol=1e-6)
    only_lora = merge_lora(model).eval()
    assert only_lora.config.peft_methods == ("ia3",)
    torch.testing.assert_close(logits(only_lora, ids, mask), logits(model, ids, mask), rtol=0, atol=1e-6)


@pytest.mark.parametrize("prompt_type, methods, match", [
    ("prefix_prompt", None, "no mergeable method"),
    ("prefix_prompt,Gene_token_prompt", "prefix_prompt", "cannot be merged"),
    ("ia3", "dora", "does not include 'dora'"),
    ("", None, "no mergeable method"),
])
def test_merge_peft_raises_clearly(prompt_type, methods, match):
    model = build(tiny_config(prompt_type=prompt_type))
    with pytest.raises(ValueError, match=match):
        merge_peft(model, methods)
