"""LoRA parity with HuggingFace ``peft`` on HF ``transformers`` BERT: the same base weights
and the same nonzero A and B give the same logits (scaling = lora_alpha / r)."""
from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers", reason="the LoRA reference is HF transformers + peft")
hf_peft = pytest.importorskip("peft", reason="the LoRA reference is HuggingFace peft")

from peft_cases import TINY, batch, build, perturb_peft, tiny_config  # noqa: E402


def hf_config(**extra):
    keys = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
            "max_position_embeddings", "hidden_act", "hidden_dropout_prob", "attention_probs_dropout_prob",
            "num_labels")
    return transformers.BertConfig(**{k: TINY[k] for k in keys}, **extra)


@pytest.mark.parametrize("r, alpha, targets", [
    pytest.param(8, 1, ["query", "value"], id="r8_alpha1_qv"),
    pytest.param(4, 16, ["query", "value"], id="r4_alpha16_qv"),
    pytest.param(4, 16, ["query", "key", "value"], id="r4_alpha16_qkv"),
])
def test_lora_matches_peft(r, alpha, targets):
    ours = build(tiny_config(prompt_type="lora", lora_r=r, lora_alpha=alpha, lora_target_modules=targets))
    perturb_peft(ours, std=0.5)  # nonzero A and B, large enough to matter at alpha 1
    ours.eval()
    state = ours.state_dict()

    torch.manual_seed(0)
    hf = transformers.BertForSequenceClassification(hf_config())
    base_state = {k: v for k, v in state.items() if "lora_" not in k}
    missing, unexpected = hf.load_state_dict(base_state, strict=False)
    assert not unexpected
    assert all("position_ids" in k or "token_type_ids" in k for k in missing), missing
    lora_config = hf_peft.LoraConfig(r=r, lora_alpha=alpha, target_modules=targets, lora_dropout=0.0)
    hf = hf_peft.get_peft_model(hf, lora_config).eval()

    copied = 0
    with torch.no_grad():
        for name, module in hf.named_modules():
            if isinstance(module, hf_peft.tuners.lora.LoraLayer):
                ours_name = name.replace("base_model.model.", "", 1)
                assert module.scaling["default"] == pytest.approx(alpha / r)
                module.lora_A["default"].weight.copy_(state[ours_name + ".lora_A"])
                module.lora_B["default"].weight.copy_(state[ours_name + ".lora_B"])
                copied += 1
    assert copied == len(targets) * TINY["num_hidden_layers"]

    ids, mask, _ = batch()
    with torch.no_grad():
        want = hf(input_ids=ids, attention_mask=mask, output_hidden_states=True)
        got = ours(ids, attention_mask=mask, output_hidden_states=True)
        with hf.disable_adapter():
            base_only = hf(input_ids=ids, attention_mask=mask, output_hidden_states=True)
    torch.testing.assert_close(got.logits, want.logits, rtol=0, atol=1e-5)
    real = mask.bool()  # hidden states are O(1), a sharper check than the small logits
    torch.testing.assert_close(got.hidden_states[-1][real], want.hidden_states[-1][real], rtol=1e-5, atol=2e-5)
    # and the LoRA update is not negligible: the base alone differs
    assert (base_only.hidden_states[-1][real] - want.hidden_states[-1][real]).abs().max() > 1e-2
