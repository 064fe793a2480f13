"""Numerical parity of our BERT with ``transformers``' (docs/peft_keys.md §9: same numbers).

HF models are random-initialised and perturbed (so biases and LayerNorms are not the
trivial 0 / 1), saved the two ways Geneformer checkpoints exist on disk (safetensors, and
the ``pytorch_model.bin`` that HF 4.x wrote) and loaded by ours; and the reverse.

Hidden states are compared at every position, padding included: both models mask only
the keys, so a padded query row still attends to the real tokens and is computed the same
way by both. Nothing is downloaded.
"""
from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip(
    "transformers", reason="parity tests compare against HuggingFace transformers as the reference")

import transformerslocal as tl  # noqa: E402
from bert_factories import (  # noqa: E402
    GENEFORMER_V1_6L,
    TINY_CONFIG,
    hf_tiny_model,
    ours_tiny_model,
    padded_batch,
    save_hf,
)

ATOL = 1e-5
LENGTHS = (11, 7, 3)  # right padding of different lengths; the longest row is unpadded


def assert_close(actual, expected, what: str, atol: float = ATOL) -> None:
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    torch.testing.assert_close(actual, expected, atol=atol, rtol=0, msg=lambda m: f"{what}: {m}")


def run_both(ours, hf, input_ids, attention_mask, **kwargs):
    with torch.no_grad():
        mine = ours(input_ids, attention_mask, **kwargs)
        ref = hf(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
    return mine, ref


# ----------------------------------------------------------------------------- HF -> ours
LOAD_CASES = [
    # (head, hidden_act, format)
    ("BertForMaskedLM", "relu", "safetensors"),
    ("BertForMaskedLM", "relu", "bin"),
    ("BertForSequenceClassification", "relu", "safetensors"),
    ("BertForSequenceClassification", "relu", "bin"),
    ("BertForTokenClassification", "relu", "safetensors"),
    ("BertForTokenClassification", "relu", "bin"),
    ("BertForSequenceClassification", "gelu", "safetensors"),
    ("BertModel", "relu", "bin"),
]


@pytest.mark.parametrize("head,act,fmt", LOAD_CASES, ids=["-".join(c) for c in LOAD_CASES])
def test_hf_checkpoint_loads_with_same_numbers(tmp_path, head, act, fmt):
    hf = hf_tiny_model(head, hidden_act=act, num_labels=3)
    save_hf(hf, tmp_path, fmt)
    ours = getattr(tl, head).from_pretrained(tmp_path)
    assert ours.loading_info["missing_keys"] == []
    assert ours.loading_info["unexpected_keys"] == []
    assert not ours.training, "from_pretrained returns the model in eval mode, as HF does"
    input_ids, mask = padded_batch(TINY_CONFIG["vocab_size"], LENGTHS, seed=1)

    # SDPA path of ours (no attentions requested) against HF
    mine, ref = run_both(ours, hf, input_ids, mask, output_hidden_states=True)
    if head == "BertModel":
        assert_close(mine.last_hidden_state, ref.last_hidden_state, "last_hidden_state")
        assert_close(mine.pooler_output, ref.pooler_output, "pooler_output")
    else:
        assert_close(mine.logits, ref.logits, "logits")
    assert len(mine.hidden_states) == len(ref.hidden_states) == TINY_CONFIG["num_hidden_layers"] + 1
    for i, (a, b) in enumerate(zip(mine.hidden_states, ref.hidden_states)):
        assert_close(a, b, f"hidden_states[{i}]")

    # eager path of ours against HF eager attention
    mine, ref = run_both(ours, hf, input_ids, mask, output_attentions=True)
    assert len(mine.attentions) == len(ref.attentions) == TINY_CONFIG["num_hidden_layers"]
    for i, (a, b) in enumerate(zip(mine.attentions, ref.attentions)):
        assert_close(a, b, f"attentions[{i}]")
    # padded keys get no attention
    assert mine.attentions[0][2, :, :, LENGTHS[2]:].abs().max() == 0


def test_token_type_and_position_ids_match_hf(tmp_path):
    hf = hf_tiny_model("BertModel")
    save_hf(hf, tmp_path, "safetensors")
    ours = tl.BertModel.from_pretrained(tmp_path)
    input_ids, mask = padded_batch(TINY_CONFIG["vocab_size"], (9, 5), seed=2)
    token_type_ids = torch.randint(0, 2, input_ids.shape, generator=torch.Generator().manual_seed(3))
    position_ids = torch.arange(3, 3 + input_ids.shape[1]).expand_as(input_ids)
    with torch.no_grad():
        mine = ours(input_ids, mask, token_type_ids, position_ids)
        ref = hf(input_ids=input_ids, attention_mask=mask, token_type_ids=token_type_ids, position_ids=position_ids)
    assert_close(mine.last_hidden_state, ref.last_hidden_state, "last_hidden_state")


def test_geneformer_v1_shape_checkpoint(tmp_path):
    """Geneformer V1 6L shapes (vocab 25426, 2048 positions, relu), the HF 4.x .bin format."""
    hf = hf_tiny_model("BertForMaskedLM", base=GENEFORMER_V1_6L, perturb=False)
    save_hf(hf, tmp_path, "bin")
    ours = tl.BertForMaskedLM.from_pretrained(tmp_path)
    assert ours.loading_info["missing_keys"] == [] and ours.loading_info["unexpected_keys"] == []
    assert ours.cls.predictions.decoder.weight.shape == (25426, 256)
    assert ours.bert.embeddings.position_embeddings.weight.shape == (2048, 256)
    input_ids, mask = padded_batch(GENEFORMER_V1_6L["vocab_size"], (30, 17), seed=4)
    mine, ref = run_both(ours, hf, input_ids, mask, output_hidden_states=True)
    assert_close(mine.logits, ref.logits, "logits")
    for i, (a, b) in enumerate(zip(mine.hidden_states, ref.hidden_states)):
        assert_close(a, b, f"hidden_states[{i}]")


# ----------------------------------------------------------------------------- ours -> HF
@pytest.mark.parametrize("safe", [True, False], ids=["safetensors", "bin"])
@pytest.mark.parametrize("head", ["BertForMaskedLM", "BertForSequenceClassification", "BertForTokenClassification"])
def test_our_checkpoint_loads_in_hf(tmp_path, head, safe):
    ours = ours_tiny_model(head, num_labels=3)
    ours.save_pretrained(tmp_path, safe_serialization=safe)
    assert (tmp_path / ("model.safetensors" if safe else "pytorch_model.bin")).is_file()
    hf, info = getattr(transformers, head).from_pretrained(
        tmp_path, attn_implementation="eager", output_loading_info=True)
    hf.eval()
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    if head == "BertForMaskedLM":
        assert hf.cls.predictions.decoder.weight.data_ptr() == hf.bert.embeddings.word_embeddings.weight.data_ptr()
    else:
        assert hf.config.num_labels == 3
    input_ids, mask = padded_batch(TINY_CONFIG["vocab_size"], LENGTHS, seed=5)
    mine, ref = run_both(ours, hf, input_ids, mask)
    assert_close(mine.logits, ref.logits, "logits")


# ----------------------------------------------------------------------------- losses
def _loss_pair(tmp_path, head, labels, **overrides):
    hf = hf_tiny_model(head, **overrides)
    save_hf(hf, tmp_path, "safetensors")
    ours = getattr(tl, head).from_pretrained(tmp_path)
    input_ids, mask = padded_batch(TINY_CONFIG["vocab_size"], LENGTHS, seed=6)
    with torch.no_grad():
        mine = ours(input_ids, mask, labels=labels(input_ids, mask))
        ref = hf(input_ids=input_ids, attention_mask=mask, labels=labels(input_ids, mask))
    return ours, mine, ref, (input_ids, mask)


def test_sequence_classification_loss_matches_hf(tmp_path):
    _, mine, ref, _ = _loss_pair(tmp_path, "BertForSequenceClassification",
                                 lambda ids, m: torch.tensor([2, 0, 1]), num_labels=3)
    assert_close(mine.loss, ref.loss, "loss")


def test_regression_loss_matches_hf(tmp_path):
    _, mine, ref, _ = _loss_pair(tmp_path, "BertForSequenceClassification",
                                 lambda ids, m: torch.tensor([0.5, -1.0, 2.0]), num_labels=1)
    assert_close(mine.loss, ref.loss, "loss")


def test_token_classification_loss_ignores_minus_100_like_hf(tmp_path):
    def labels(ids, mask):
        out = (ids % 3).masked_fill(mask == 0, -100)
        out[0, 0] = -100  # an ignored real token too
        return out

    _, mine, ref, _ = _loss_pair(tmp_path, "BertForTokenClassification", labels, num_labels=3)
    assert_close(mine.loss, ref.loss, "loss")


def test_masked_lm_loss_matches_hf(tmp_path):
    def labels(ids, mask):
        out = torch.full_like(ids, -100)
        out[0, [1, 4, 9]] = ids[0, [1, 4, 9]]
        out[1, 2] = 7
        out[2, 0] = ids[2, 0]
        return out

    ours, mine, ref, (input_ids, mask) = _loss_pair(tmp_path, "BertForMaskedLM", labels)
    assert_close(mine.loss, ref.loss, "loss")
    with torch.no_grad():  # the pretraining fast path (decoder at masked positions only)
        fast = ours.masked_lm_loss(input_ids, mask, labels(input_ids, mask))
    assert_close(fast, ref.loss, "masked_lm_loss")
