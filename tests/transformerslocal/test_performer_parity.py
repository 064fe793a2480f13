"""Numerical parity of our scBERT Performer with performer-pytorch 1.1.4's ``PerformerLM`` built
with scBERT's settings (``rotary_position_emb=False, qkv_bias=False, attn_out_bias=True,
local_attn_heads=0``): same weights and projection matrices, same logits and hidden states
in eval mode; its gradients; its feature redraw; and the scBERT release's key stabiliser."""
from __future__ import annotations

import pytest
import torch

performer_pytorch = pytest.importorskip(
    "performer_pytorch", reason="parity tests compare against performer-pytorch (the scBERT release's Performer)")

from performer_factories import (
    RELEASED_LAYERS,
    TINY,
    ours_from_reference,
    reference_lm,
    tokens,
)

import transformerslocal as tl
from transformerslocal.modeling_performer import (
    from_performer_pytorch_state_dict,
    to_performer_pytorch_state_dict,
)

ATOL = 1e-5


def reference_hidden_states(reference, ids):
    """The embedding output and each layer's output (residual stream) of performer-pytorch,
    read with hooks on its feed-forward blocks (layer output = input + block(input))."""
    outputs = []
    hooks = [layer[1].register_forward_hook(lambda mod, inp, out: outputs.append(inp[0] + out))
             for layer in reference.performer.net.layers]
    embedded = []
    hooks.append(reference.performer.register_forward_hook(lambda mod, inp, out: embedded.append(inp[0].clone())))
    try:
        with torch.no_grad():
            encodings = reference(ids, return_encodings=True)
    finally:
        for h in hooks:
            h.remove()
    return encodings, [embedded[0]] + outputs


@pytest.mark.parametrize("sizes,scale", [(TINY, 0.1), (RELEASED_LAYERS, 0.02)], ids=["tiny", "released-layer-shape"])
def test_logits_and_hidden_states_match_performer_pytorch(sizes, scale):
    reference = reference_lm(sizes, scale=scale)
    ours = ours_from_reference(reference, **sizes)
    for layer_ours, layer_ref in zip(ours.performer.net.layers, reference.performer.net.layers):
        assert torch.equal(layer_ours[0].fn.fast_attention.projection_matrix,
                           layer_ref[0].fn.fast_attention.projection_matrix)
    ids = tokens(3, sizes["max_seq_len"], seed=1)
    with torch.no_grad():
        out = ours(ids, output_hidden_states=True)
        ref_logits = reference(ids)
    ref_encodings, ref_hidden = reference_hidden_states(reference, ids)
    torch.testing.assert_close(out.logits, ref_logits, atol=ATOL, rtol=0)
    torch.testing.assert_close(ours.encode(ids).last_hidden_state, ref_encodings, atol=ATOL, rtol=0)
    assert len(out.hidden_states) == sizes["depth"] + 1
    for i, (mine, theirs) in enumerate(zip(out.hidden_states, ref_hidden)):
        torch.testing.assert_close(mine, theirs, atol=ATOL, rtol=0, msg=lambda m, i=i: f"hidden state {i}: {m}")


def test_shorter_input_than_max_seq_len_matches():
    reference = reference_lm(TINY)
    ours = ours_from_reference(reference, **TINY)
    ids = tokens(2, TINY["max_seq_len"] - 9, seed=2)
    with torch.no_grad():
        torch.testing.assert_close(ours(ids).logits, reference(ids), atol=ATOL, rtol=0)


def test_gradients_match_performer_pytorch():
    reference = reference_lm(TINY).train()
    ours = ours_from_reference(reference, **TINY).train()
    ours.performer.fix_projection_matrices_()
    reference.fix_projection_matrices_()
    ids = tokens(2, TINY["max_seq_len"], seed=3)
    target = tokens(2, TINY["max_seq_len"], seed=4)
    torch.nn.functional.cross_entropy(ours(ids).logits.transpose(1, 2), target).backward()
    torch.nn.functional.cross_entropy(reference(ids).transpose(1, 2), target).backward()
    ref_grads = {k: p.grad for k, p in reference.named_parameters() if p.grad is not None}
    mine = {k: p.grad for k, p in ours.named_parameters()}
    assert set(mine) == set(ref_grads) - {"pos_emb.emb.weight"}  # ours is frozen (a buffer)
    for key, grad in mine.items():
        torch.testing.assert_close(grad, ref_grads[key], atol=1e-5, rtol=1e-4, msg=lambda m, k=key: f"{k}: {m}")


def test_saved_checkpoint_loads_into_performer_pytorch(tmp_path):
    reference = reference_lm(TINY, seed=5)
    ours = ours_from_reference(reference, **TINY)
    ours.save_pretrained(tmp_path / "ckpt")
    loaded = tl.PerformerForMaskedLM.from_pretrained(tmp_path / "ckpt")
    assert loaded.loading_info["missing_keys"] == [] and loaded.loading_info["discarded_head_keys"] == []
    fresh = performer_pytorch.PerformerLM(**TINY, local_attn_heads=0, rotary_position_emb=False, qkv_bias=False,
                                          attn_out_bias=True).eval()
    fresh.load_state_dict(to_performer_pytorch_state_dict(loaded.state_dict()), strict=True)
    ids = tokens(2, TINY["max_seq_len"], seed=6)
    with torch.no_grad():
        torch.testing.assert_close(fresh(ids), loaded(ids).logits, atol=ATOL, rtol=0)
        torch.testing.assert_close(fresh(ids), reference(ids), atol=ATOL, rtol=0)


def test_performer_pytorch_names_load_through_from_pretrained(tmp_path):
    reference = reference_lm(TINY, seed=7)
    directory = tmp_path / "pp"
    directory.mkdir()
    tl.PerformerConfig(**TINY).save_pretrained(directory)
    torch.save(reference.state_dict(), directory / "pytorch_model.bin")  # 1.1.4 names, proj_updater copies
    ours = tl.PerformerForMaskedLM.from_pretrained(directory)
    assert ours.loading_info["missing_keys"] == []
    ids = tokens(2, TINY["max_seq_len"], seed=8)
    with torch.no_grad():
        torch.testing.assert_close(ours(ids).logits, reference(ids), atol=ATOL, rtol=0)


def test_edited_duplicate_of_performer_pytorch_is_refused():
    state = reference_lm(TINY).state_dict()
    key = "performer.proj_updater.instance.layers.0.0.fn.to_q.weight"
    state[key] = state[key] + 1
    with pytest.raises(ValueError, match="differs from performer.net.layers.0.0.fn.to_q.weight"):
        from_performer_pytorch_state_dict(state)


# ----------------------------------------------------------------------------- feature redraw
def test_redraw_schedule_and_matrices_match_performer_pytorch():
    reference = reference_lm(TINY, feature_redraw_interval=2).train()
    ours = ours_from_reference(reference, **TINY, feature_redraw_interval=2).train()
    ids = tokens(1, TINY["max_seq_len"], seed=9)

    def projections(model):
        return [layer[0].fn.fast_attention.projection_matrix.clone() for layer in model.performer.net.layers]

    start = projections(ours)
    for call in range(4):
        torch.manual_seed(100 + call)
        with torch.no_grad():
            mine = ours(ids).logits
        torch.manual_seed(100 + call)
        with torch.no_grad():
            theirs = reference(ids)
        torch.testing.assert_close(mine, theirs, atol=ATOL, rtol=0)
        for a, b in zip(projections(ours), projections(reference)):
            assert torch.equal(a, b), f"call {call}: projection matrices differ after the redraw check"
        assert int(ours.performer.calls_since_last_redraw) == int(
            reference.performer.proj_updater.calls_since_last_redraw)
        # counter 0 -> 1 -> 2 -> redraw (reset to 0) on the third call -> 1
        redrawn = call >= 2
        assert all(torch.equal(a, b) != redrawn for a, b in zip(projections(ours), start)), call


def test_eval_mode_never_redraws_nor_counts():
    ours = tl.PerformerForMaskedLM(tl.PerformerConfig(**TINY, feature_redraw_interval=0),
                                   warn_random_positions=False).eval()
    before = [layer[0].fn.fast_attention.projection_matrix.clone() for layer in ours.performer.net.layers]
    with torch.no_grad():
        for _ in range(3):
            ours(tokens(1, TINY["max_seq_len"]))
    assert int(ours.performer.calls_since_last_redraw) == 0
    for layer, b in zip(ours.performer.net.layers, before):
        assert torch.equal(layer[0].fn.fast_attention.projection_matrix, b)


# ----------------------------------------------------------------------------- the release's kernel
def _release_softmax_kernel(data, *, projection_matrix, is_query, normalize_data=True, eps=1e-4, device=None):
    """The key stabiliser of the performer copy vendored by the scBERT release: the maximum over
    the whole key tensor (batch, heads, positions, features); queries as performer-pytorch."""
    normalizer = data.shape[-1] ** -0.25 if normalize_data else 1.0
    ratio = projection_matrix.shape[0] ** -0.5
    data_dash = torch.einsum("...id,...jd->...ij", normalizer * data, projection_matrix.type_as(data))
    diag = (data ** 2).sum(dim=-1, keepdim=True) / 2.0 * normalizer ** 2
    if is_query:
        stabiliser = data_dash.amax(dim=-1, keepdim=True)
    else:
        stabiliser = data_dash.max()
    return ratio * (torch.exp(data_dash - diag - stabiliser) + eps)


def test_cell_stabiliser_is_the_release_kernel_one_cell_at_a_time(monkeypatch):
    reference = reference_lm(TINY, seed=11)
    cell = ours_from_reference(reference, **TINY, key_stabilizer="cell")
    head = ours_from_reference(reference, **TINY, key_stabilizer="head")
    ids = tokens(3, TINY["max_seq_len"], seed=12)
    with torch.no_grad():
        per_head = head(ids).logits
        batched = cell(ids).logits
        monkeypatch.setattr(performer_pytorch.performer_pytorch, "softmax_kernel", _release_softmax_kernel)
        for row in range(len(ids)):
            release = reference(ids[row:row + 1])
            torch.testing.assert_close(batched[row:row + 1], release, atol=ATOL, rtol=0)
    # the two stabilisers differ through the kernel's eps (not a rounding difference)
    assert (batched - per_head).abs().max() > 1e-4
