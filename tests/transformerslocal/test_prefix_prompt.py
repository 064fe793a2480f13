"""Prefix prompts: inserted after token 0 without position ids, overwritten by deeper
layers, removed before the heads; the attention mask is extended inside the model."""
from __future__ import annotations

import pytest
import torch

from peft_cases import TINY, base_model, batch, build, logits, perturb_peft, tiny_config
from transformerslocal import (
    BertForSequenceClassification,
    BertForTokenClassification,
    BertModel,
    mark_trainable,
)

T = TINY["num_token"]
D = TINY["hidden_size"]


def prompt_model(seed: int = 0, model_class=BertForSequenceClassification, **overrides):
    return build(tiny_config(prompt_type="prefix_prompt", **overrides), seed, model_class).eval()


def prompt_modules(model):
    return [layer.prompt_embeddings for layer in model.bert.encoder.layer if layer.prompt_embeddings is not None]


# ----------------------------------------------------------------------------- shapes
@pytest.mark.parametrize("n_layers_conf", [[1, 0], [1, 1], [0, 1]])
def test_outputs_have_gene_tokens_only(n_layers_conf):
    ids, mask, _ = batch()
    model = prompt_model(n_layers_conf=n_layers_conf)
    with torch.no_grad():
        out = model(ids, attention_mask=mask, output_hidden_states=True, output_attentions=True)
    assert out.logits.shape == (3, TINY["num_labels"])
    assert len(out.hidden_states) == TINY["num_hidden_layers"] + 1
    assert all(h.shape == (*ids.shape, D) for h in out.hidden_states)
    token_model = prompt_model(model_class=BertForTokenClassification, n_layers_conf=n_layers_conf)
    with torch.no_grad():
        token_logits = token_model(ids, attention_mask=mask).logits
    assert token_logits.shape == (*ids.shape, TINY["num_labels"])
    bare = prompt_model(model_class=BertModel, n_layers_conf=n_layers_conf)
    with torch.no_grad():
        assert bare(ids, mask).last_hidden_state.shape == (*ids.shape, D)


# ----------------------------------------------------------------------------- init
def test_prompts_are_distinct_at_init_and_after_training():
    num_token, init = 64, 0.02
    model = build(tiny_config(prompt_type="prefix_prompt", num_token=num_token, initializer_range=init))
    weight = prompt_modules(model)[0].weight
    assert weight.shape == (num_token, D)
    assert weight.std().item() == pytest.approx(init, rel=0.15)
    assert abs(weight.mean().item()) < init / 5
    assert torch.cdist(weight, weight).add(torch.eye(num_token) * 1e9).min() > 0

    mark_trainable(model)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    ids, mask, labels = batch()
    before = weight.detach().clone()
    model.train()
    model(ids, attention_mask=mask, labels=labels).loss.backward()
    optimizer.step()
    after = weight.detach()
    assert not torch.equal(after, before)
    distances = torch.cdist(after, after) + torch.eye(num_token) * 1e9
    assert distances.min() > 1e-4  # exchangeable prompts would have collapsed (identical rows)
    # and each prompt got its own update, not one shared vector
    update = after - before
    assert (update - update[0]).abs().max() > 1e-6


# ----------------------------------------------------------------------------- mean pooling
@pytest.mark.parametrize("n_layers_conf", [[1, 0], [1, 1]])
def test_mean_pooling_sees_real_gene_tokens_only(n_layers_conf):
    model = prompt_model(classifier_pooling="mean", n_layers_conf=n_layers_conf)
    perturb_peft(model)
    ids, mask, _ = batch()
    with torch.no_grad():
        out = model.bert(ids, mask)
        real = mask.unsqueeze(-1).float()
        manual_mean = (out.last_hidden_state * real).sum(1) / real.sum(1)
        manual = model.bert.pooler.activation(model.bert.pooler.dense(manual_mean))
    torch.testing.assert_close(out.pooler_output, manual, rtol=0, atol=1e-6)

    # what sits in the padded positions does not matter
    other_pad = ids.clone()
    other_pad[mask == 0] = torch.randint(1, TINY["vocab_size"], (int((mask == 0).sum()),))
    torch.testing.assert_close(logits(model, other_pad, mask), logits(model, ids, mask), rtol=0, atol=1e-6)


def test_mean_pooling_does_not_average_the_prompt_positions():
    """With the prompts masked out as keys, mean pooling must equal the base model's:
    averaging over prompt positions (or dropping the wrong ones) would change it."""
    base = base_model(seed=0, classifier_pooling="mean")
    model = prompt_model(seed=1, classifier_pooling="mean")
    model.load_checkpoint_state(base.state_dict(), report_missing=False)
    ids, mask, _ = batch()
    for module in prompt_modules(model):
        module.attend = False
    torch.testing.assert_close(logits(model, ids, mask), logits(base, ids, mask), rtol=0, atol=1e-6)


# ----------------------------------------------------------------------------- long input
def test_2048_genes_plus_64_prompts_fit_2048_positions():
    model = build(tiny_config(prompt_type="prefix_prompt", num_token=64, max_position_embeddings=2048)).eval()
    ids = torch.randint(1, TINY["vocab_size"], (1, 2048))
    with torch.no_grad():
        out = model.bert(ids)
    assert out.last_hidden_state.shape == (1, 2048, D)
    with pytest.raises(ValueError, match="max_position_embeddings"):
        model.bert(torch.randint(1, TINY["vocab_size"], (1, 2049)))


# ----------------------------------------------------------------------------- placement
def capture_layer_io(model):
    """Record each encoder layer's input and output hidden states."""
    seen = {}

    def pre(i):
        return lambda module, args: seen.__setitem__(("in", i), args[0].detach().clone())

    def post(i):
        return lambda module, args, out: seen.__setitem__(("out", i), out[0].detach().clone())

    handles = []
    for i, layer in enumerate(model.bert.encoder.layer):
        handles.append(layer.register_forward_pre_hook(pre(i)))
        handles.append(layer.register_forward_hook(post(i)))
    return seen, handles


def test_prompts_are_inserted_after_token_0_without_positions():
    model = prompt_model()
    ids, mask, _ = batch()
    seen, handles = capture_layer_io(model)
    with torch.no_grad():
        emb = model.bert.embed(ids)
        model(ids, attention_mask=mask)
    for h in handles:
        h.remove()
    x = seen[("in", 0)]
    assert x.shape == (3, ids.shape[1] + T, D)
    torch.testing.assert_close(x[:, 0], emb[:, 0], rtol=0, atol=0)
    prompts = prompt_modules(model)[0].weight.detach()
    torch.testing.assert_close(x[:, 1:1 + T], prompts.expand(3, -1, -1), rtol=0, atol=0)  # no position added
    torch.testing.assert_close(x[:, 1 + T:], emb[:, 1:], rtol=0, atol=0)


def test_deep_prompts_overwrite_the_inserted_positions():
    model = prompt_model(n_layers_conf=[1, 1])
    ids, mask, _ = batch()
    seen, handles = capture_layer_io(model)
    before = logits(model, ids, mask)
    for h in handles:
        h.remove()
    first, second = (m.weight.detach() for m in prompt_modules(model))
    layer1_in, layer0_out = seen[("in", 1)], seen[("out", 0)]
    torch.testing.assert_close(layer1_in[:, 1:1 + T], second.expand(3, -1, -1), rtol=0, atol=0)
    assert not torch.allclose(layer0_out[:, 1:1 + T], layer1_in[:, 1:1 + T])
    # gene tokens flow through unchanged
    torch.testing.assert_close(layer1_in[:, :1], layer0_out[:, :1], rtol=0, atol=0)
    torch.testing.assert_close(layer1_in[:, 1 + T:], layer0_out[:, 1 + T:], rtol=0, atol=0)
    # the second layer's prompts affect the output
    with torch.no_grad():
        hidden_before = model.bert(ids, mask).last_hidden_state
        prompt_modules(model)[1].weight.copy_(torch.randn(T, D))
        hidden_after = model.bert(ids, mask).last_hidden_state
    assert (hidden_after - hidden_before).abs().max() > 1e-3  # float noise is ~1e-7
    assert not torch.equal(logits(model, ids, mask), before)


def test_deep_prompts_train_both_layers():
    model = build(tiny_config(prompt_type="prefix_prompt", n_layers_conf=[1, 1]))
    mark_trainable(model)
    ids, mask, labels = batch()
    model(ids, attention_mask=mask, labels=labels).loss.backward()
    for module in prompt_modules(model):
        assert module.weight.grad is not None and module.weight.grad.abs().sum() > 0


# ----------------------------------------------------------------------------- attention mask
@pytest.mark.parametrize("overrides", [
    pytest.param(dict(prompt_type="prefix_prompt"), id="prefix"),
    pytest.param(dict(prompt_type="prefix_prompt", n_layers_conf=[1, 1]), id="deep_prefix"),
    pytest.param(dict(prompt_type="prefix_prompt", classifier_pooling="mean"), id="prefix_mean"),
    pytest.param(dict(prompt_type="lora,prefix_prompt,Gene_token_prompt,encoder_prompt"), id="all_four"),
    pytest.param(dict(prompt_type=""), id="full"),
])
def test_padded_batch_equals_each_cell_alone(overrides):
    model = build(tiny_config(**overrides)).eval()
    perturb_peft(model)
    ids, mask, _ = batch(lengths=(7, 3, 5))
    together = logits(model, ids, mask)
    for i, length in enumerate(mask.sum(1).tolist()):
        alone = logits(model, ids[i:i + 1, :length], None)
        torch.testing.assert_close(together[i:i + 1], alone, rtol=0, atol=1e-6)
