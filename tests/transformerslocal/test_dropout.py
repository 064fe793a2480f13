"""The CPU dropout (transformerslocal/dropout.py) and the training-mode attention that uses it.

What must hold: masks drop each element independently with probability p (all 32 bits of
the random fields used), kept elements are scaled by 1/(1-p) in forward and backward, the
seed reproduces the masks (so gradient checkpointing recomputes the same ones), and with
nothing dropped the training-mode attention equals SDPA, forward and backward, padding
included.
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import transformerslocal as tl
from bert_factories import TINY_CONFIG, ours_tiny_model, padded_batch
from transformerslocal.dropout import Dropout, dropout, keep_mask
from transformerslocal.modeling_bert import attention_with_cpu_dropout


@pytest.mark.parametrize("p", [0.02, 0.1, 0.5])
def test_drop_fraction_is_p(p):
    torch.manual_seed(0)
    n = 1_000_000
    dropped = (~keep_mask((n,), p)).double().mean().item()
    sigma = math.sqrt(p * (1 - p) / n)
    assert abs(dropped - p) < 5 * sigma, (dropped, p)


def test_random_fields_use_all_32_bits():
    # the fields are 32-bit halves of 64-bit draws; a draw range that left a bit constant
    # (e.g. random_() without bounds never sets the sign bit) would bias every other element
    torch.manual_seed(1)
    n = 400_000
    bits = torch.empty(n // 2, dtype=torch.int64).random_(-(2 ** 63), 2 ** 63 - 1).view(torch.int32)
    for half in (bits[0::2], bits[1::2]):
        for b in range(32):
            frac = ((half >> b) & 1).double().mean().item()
            assert abs(frac - 0.5) < 5 * math.sqrt(0.25 / half.numel()), (b, frac)
    # both halves drop at rate p, not only the low one
    torch.manual_seed(2)
    keep = keep_mask((n,), 0.25)
    for part in (keep[0::2], keep[1::2]):
        assert abs((~part).double().mean().item() - 0.25) < 5 * math.sqrt(0.25 * 0.75 / part.numel())


def test_forward_and_backward_scale_the_kept_elements():
    p = 0.3
    x = torch.randn(7, 5, 11, requires_grad=True)
    torch.manual_seed(3)
    y = dropout(x, p)
    torch.manual_seed(3)
    keep = keep_mask(x.shape, p)
    expected = torch.where(keep, x.detach() / (1 - p), torch.zeros(()))
    torch.testing.assert_close(y.detach(), expected, rtol=1e-6, atol=0)
    assert 0 < (~keep).sum() < keep.numel()
    g = torch.randn_like(x)
    y.backward(g)
    torch.testing.assert_close(x.grad, torch.where(keep, g / (1 - p), torch.zeros(())), rtol=1e-6, atol=0)


def test_module_is_identity_in_eval_and_at_p0_and_zero_at_p1():
    x = torch.randn(4, 9)
    m = Dropout(0.5)
    assert m.eval()(x) is x
    assert Dropout(0.0).train()(x) is x
    assert torch.equal(Dropout(1.0).train()(x), torch.zeros_like(x))
    assert m.state_dict() == {} and "p=0.5" in repr(m)
    with pytest.raises(ValueError, match="between 0 and 1"):
        Dropout(1.5)


def test_same_seed_same_mask_and_bf16():
    x = torch.randn(64, 64)
    torch.manual_seed(4)
    a = dropout(x, 0.2)
    torch.manual_seed(4)
    b = dropout(x, 0.2)
    assert torch.equal(a, b)
    torch.manual_seed(4)
    c = dropout(x.bfloat16(), 0.2)
    assert c.dtype == torch.bfloat16 and torch.equal(c == 0, a == 0)


def _qkv_and_mask(seed=5):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(3, 4, 10, 8, generator=g).requires_grad_() for _ in range(3))
    mask = torch.ones(3, 1, 1, 10, dtype=torch.bool)
    mask[1, ..., 6:] = False
    mask[2, ..., 2:] = False
    return q, k, v, mask


@pytest.mark.parametrize("padded", [True, False])
def test_attention_with_nothing_dropped_equals_sdpa(padded):
    q, k, v, mask = _qkv_and_mask()
    mask = mask if padded else None
    g = torch.randn(3, 4, 10, 8)
    # p > 0 takes the dropout path; round(1e-12 * 2**32) = 0 drops nothing
    ours = attention_with_cpu_dropout(q, k, v, mask, 1e-12)
    ours_grads = torch.autograd.grad(ours, (q, k, v), g)
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    ref_grads = torch.autograd.grad(ref, (q, k, v), g)
    torch.testing.assert_close(ours, ref, atol=1e-6, rtol=0)
    for a, b in zip(ours_grads, ref_grads):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0)


def test_attention_under_bf16_autocast_is_close_to_fp32():
    q, k, v, mask = _qkv_and_mask(8)
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = attention_with_cpu_dropout(q, k, v, mask, 1e-12)
    assert low.dtype == torch.bfloat16
    torch.testing.assert_close(low.float(), ref, atol=3e-2, rtol=3e-2)


def test_attention_drops_probabilities_with_the_seeded_mask():
    q, k, v, mask = _qkv_and_mask(6)
    p = 0.3
    torch.manual_seed(7)
    ours = attention_with_cpu_dropout(q, k, v, mask, p)
    torch.manual_seed(7)
    keep = keep_mask((12, 10, 10), p).view(3, 4, 10, 10)
    scores = (q @ k.transpose(-1, -2) / math.sqrt(8)).masked_fill(~mask, float("-inf"))
    expected = (scores.softmax(-1) * keep / (1 - p)) @ v
    torch.testing.assert_close(ours, expected, atol=1e-6, rtol=0)


def _set_dropout(model, p):
    for m in model.modules():
        if isinstance(m, Dropout):
            m.p = p
        if hasattr(m, "dropout_prob"):
            m.dropout_prob = p


def test_training_mode_model_with_nothing_dropped_equals_eval_mode():
    """The whole model in train mode (CPU dropout path everywhere) against eval mode (SDPA):
    same logits and same gradients for every parameter, padded batch."""
    model = ours_tiny_model("BertForSequenceClassification", num_labels=3)
    batch = padded_batch(TINY_CONFIG["vocab_size"], (9, 6, 4), seed=3)
    labels = torch.tensor([0, 2, 1])
    results = []
    for train in (False, True):
        _set_dropout(model, 1e-12)
        model.train(train)
        model.zero_grad(set_to_none=True)
        out = model(*batch, labels=labels)
        out.loss.backward()
        results.append((out.logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    (eval_logits, eval_grads), (train_logits, train_grads) = results
    torch.testing.assert_close(train_logits, eval_logits, atol=1e-6, rtol=0)
    for name, grad in eval_grads.items():
        torch.testing.assert_close(train_grads[name], grad, atol=1e-6, rtol=0, msg=name)


def test_checkpointing_recomputes_the_same_dropout_masks():
    model = ours_tiny_model("BertForSequenceClassification", num_labels=3,
                            hidden_dropout_prob=0.2, attention_probs_dropout_prob=0.2).train()
    batch = padded_batch(TINY_CONFIG["vocab_size"], (9, 6, 4), seed=3)
    labels = torch.tensor([0, 2, 1])
    runs = []
    for ckpt in (False, True):
        if ckpt:
            model.gradient_checkpointing_enable()
        torch.manual_seed(8)
        model.zero_grad(set_to_none=True)
        loss = model(*batch, labels=labels).loss
        loss.backward()
        runs.append((loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    (loss, grads), (ckpt_loss, ckpt_grads) = runs
    torch.testing.assert_close(ckpt_loss, loss, atol=1e-6, rtol=0)
    for name in grads:
        torch.testing.assert_close(ckpt_grads[name], grads[name], atol=1e-6, rtol=0, msg=name)
    # and dropout really was on: another seed gives another loss
    torch.manual_seed(9)
    assert not torch.allclose(model(*batch, labels=labels).loss, loss)


def test_model_uses_the_cpu_dropout_modules():
    model = tl.BertForSequenceClassification(tl.BertConfig(**{**TINY_CONFIG, "num_labels": 2}))
    assert not any(type(m) is torch.nn.Dropout for m in model.modules())
    # per layer: attention probabilities, attention output, feed-forward output; + embeddings, classifier
    assert sum(isinstance(m, Dropout) for m in model.modules()) == 3 * TINY_CONFIG["num_hidden_layers"] + 2
