"""Without an autograd graph (inference), the activation and the residual adds reuse their
input's buffer: outputs are bit-identical to the graph-recording forward for every PEFT method
and activation, the buffers really are reused, and with a graph nothing is done in place."""
from __future__ import annotations

import pytest
import torch

from peft_cases import CASE_PARAMS, Case, base_model, batch, build, perturb_peft


def outputs(model, ids, mask) -> tuple[torch.Tensor, ...]:
    out = model(ids, mask, output_hidden_states=True)
    return (out.logits, *out.hidden_states)


@pytest.mark.parametrize("case", CASE_PARAMS)
def test_no_grad_forward_is_bit_identical(case: Case):
    model = build(case.config()).eval()
    perturb_peft(model)  # nonzero LoRA B, adapter outputs ...: the methods really act
    ids, mask, _ = batch()
    with torch.enable_grad():
        recorded = [t.detach() for t in outputs(model, ids, mask)]
    with torch.no_grad():
        inference = outputs(model, ids, mask)
        first_token = model(ids, mask).logits  # the last layer on token 0 alone, in place too
    for a, b in zip(recorded, inference):
        assert torch.equal(a, b)
    torch.testing.assert_close(first_token, recorded[0], rtol=0, atol=1e-6)


@pytest.mark.parametrize("act", ["relu", "gelu", "silu", "tanh"])
def test_activations_bit_identical_and_in_place_where_torch_has_it(act: str):
    model = base_model(seed=0, hidden_act=act).eval()
    ids, mask, _ = batch()
    intermediate = model.bert.encoder.layer[0].intermediate
    seen = []
    intermediate.dense.register_forward_hook(lambda _m, _a, out: seen.append(out.data_ptr()))
    intermediate.register_forward_hook(lambda _m, _a, out: seen.append(out.data_ptr()))
    with torch.enable_grad():
        recorded = [t.detach() for t in outputs(model, ids, mask)]
    assert seen[0] != seen[1], "with a graph the activation allocates its own output"
    seen.clear()
    with torch.no_grad():
        inference = outputs(model, ids, mask)
    assert (seen[0] == seen[1]) == (act != "gelu")
    for a, b in zip(recorded, inference):
        assert torch.equal(a, b)


def test_residual_add_writes_into_the_sublayer_output():
    model = base_model(seed=0).eval()
    ids, mask, _ = batch()
    layer = model.bert.encoder.layer[0]
    dense_out, norm_in = [], []
    layer.output.dense.register_forward_hook(lambda _m, _a, out: dense_out.append(out.data_ptr()))
    layer.output.LayerNorm.register_forward_pre_hook(lambda _m, args: norm_in.append(args[0].data_ptr()))
    with torch.no_grad():
        model(ids, mask)
    assert dense_out == norm_in
    dense_out.clear()
    norm_in.clear()
    model(ids, mask).logits.sum().backward()
    assert dense_out != norm_in


def test_training_gradients_unchanged_by_the_inference_path():
    """A no-grad forward in between leaves the next training step's gradients as they were."""
    ids, mask, labels = batch()
    grads = []
    for interleave in (False, True):
        model = base_model(seed=0).train()
        if interleave:
            with torch.no_grad():
                model.eval()(ids, mask)
            model.train()
        torch.manual_seed(0)
        model(ids, mask, labels=labels).loss.backward()
        grads.append([p.grad.clone() for p in model.parameters() if p.grad is not None])
    for a, b in zip(*grads):
        assert torch.equal(a, b)
