"""CellFMConfig and the CellFM models: the formulas against a plain per-head reference written
from the description, masks, heads, saving and loading."""
from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

import transformerslocal as tl
from transformerslocal.configuration_bert import BertConfig
from transformerslocal.modeling_cellfm import mask_values

TINY = dict(vocab_size=32, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=24,
            value_slots=16, max_genes=12)


def _perturb(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Random values everywhere (LayerNorms and the scalar ``a`` off their start)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.3)
    return model.eval()


def _batch(seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, TINY["vocab_size"], (3, 7), generator=gen)
    values = torch.rand(3, 7, generator=gen) * 4
    mask = torch.ones(3, 7, dtype=torch.long)
    mask[1, 5:] = 0
    mask[2, 2:] = 0
    ids = ids * mask
    values = values * mask
    return ids, values, mask


def reference(state: dict, ids, values, mask, value_mask=None, *, heads: int, layers: int, eps=1e-7, slope=0.2):
    """The description, one cell, one head and one position at a time, in float64."""
    w = {k: v.double() for k, v in state.items()}
    d = w["cls_token"].shape[-1]
    e = d // heads
    alpha = (2 * layers) ** 0.25
    outs = []
    for c in range(ids.shape[0]):
        rows = [w["cls_token"][0, 0]]
        for j in range(ids.shape[1]):
            x = values[c, j].double().reshape(1)
            s = F.leaky_relu(w["value_enc.value_enc.w1.weight"] @ x, slope)
            s = w["value_enc.value_enc.w3.weight"] @ s + w["value_enc.value_enc.a"][0, 0] * s
            emb = w["value_enc.value_enc.table.weight"] @ torch.softmax(s, 0)
            if value_mask is not None and value_mask[c, j]:
                emb = w["value_enc.mask_emb"][0, 0]
            rows.append(w["gene_emb"][ids[c, j]] + emb)
        m = torch.cat([torch.ones(1), mask[c].double()])
        h = torch.stack(rows) * m[:, None]
        n_genes = m.sum() - 1
        for layer in range(layers):
            p = f"encoder.{layer}."
            lin = lambda name, t: t @ w[p + name + ".weight"].T  # noqa: E731
            heads_out = []
            for hd in range(heads):
                sl = slice(hd * e, (hd + 1) * e)
                q = F.relu(lin("attn.q_proj", h))[:, sl] / e ** 0.5
                k = F.relu(lin("attn.k_proj", h))[:, sl] / e ** 0.5 * m[:, None]
                v = lin("attn.v_proj", h)[:, sl] / n_genes.sqrt()
                kv = sum(torch.outer(k[i], v[i]) for i in range(h.shape[0]))
                o = q @ kv
                o = torch.stack([r / max(r.norm() / e ** 0.5, 1e-12) for r in o])
                heads_out.append(o)
            o = torch.cat(heads_out, 1) * F.silu(lin("attn.u_proj", h))
            h = F.layer_norm(alpha * h + lin("attn.o_proj", o), (d,), w[p + "post_norm1.weight"],
                             w[p + "post_norm1.bias"], eps)
            f = lin("ffn.o_proj", lin("ffn.u_proj", h) * lin("ffn.v_proj", h))
            h = F.layer_norm(alpha * h + f, (d,), w[p + "post_norm2.weight"], w[p + "post_norm2.bias"], eps)
        outs.append(h)
    return torch.stack(outs)


def _real(mask):
    return torch.cat([torch.ones(mask.shape[0], 1, dtype=torch.bool), mask.bool()], 1)


# ----------------------------------------------------------------------------- config
def test_defaults_are_the_released_80m_model():
    config = tl.CellFMConfig()
    assert config.model_type == "cellfm"
    assert (config.vocab_size, config.hidden_size, config.num_hidden_layers, config.num_attention_heads,
            config.head_dim, config.value_slots) == (27856, 1536, 2, 48, 32, 256)
    assert (config.leaky_relu_slope, config.layer_norm_eps, config.max_genes) == (0.2, 1e-7, 2048)
    assert config.deepnorm_alpha == pytest.approx(4 ** 0.25)


def test_the_80m_shape_has_the_released_parameter_count():
    with torch.device("meta"):  # shapes only, nothing allocated
        model = tl.CellFMModel(tl.CellFMConfig())
    d = 1536
    layers = 2 * (8 * d * d + 4 * d)  # eight d x d projections and two LayerNorms per layer
    embeddings = 27856 * d + 2 * d + 1 + 256 + 256 * 256 + d * 256  # genes, cls, mask_emb, a, w1, w3, table
    assert model.num_parameters() == layers + embeddings == 81_009_921


def test_round_trip_keeps_unknown_keys(tmp_path):
    config = tl.CellFMConfig(**TINY, num_labels=3, classifier_head="mlp", some_future_key=[1])
    config.save_pretrained(tmp_path)
    data = json.loads((tmp_path / "config.json").read_text())
    assert data["model_type"] == "cellfm" and data["some_future_key"] == [1] and data["classifier_head"] == "mlp"
    again = tl.CellFMConfig.from_pretrained(tmp_path)
    assert again == config and again.num_labels == 3


@pytest.mark.parametrize("key,value,expected", [
    ("num_attention_heads", 5, "a divisor of hidden_size"),
    ("hidden_size", 0, "an integer >= 1"),
    ("layer_norm_eps", 0, "a positive number"),
    ("classifier_head", "conv", "one of ['linear', 'mlp']"),
    ("mask_ratio", 1.5, "a number in (0, 1)"),
    ("prompt_type", "prefix_prompt", "a cellfm model has no hook for it"),
])
def test_bad_values_name_key_value_and_expectation(key, value, expected):
    with pytest.raises(ValueError, match="config key '" + key + "'") as err:
        tl.CellFMConfig(**{**TINY, key: value})
    assert expected in str(err.value) and repr(value) in str(err.value)


def test_another_family_config_is_not_read_as_cellfm(tmp_path):
    BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="model_type is 'bert'; expected 'cellfm'"):
        tl.CellFMConfig.from_pretrained(tmp_path)


# ----------------------------------------------------------------------------- encoder
def test_keys_are_the_released_names():
    keys = set(tl.CellFMModel(tl.CellFMConfig(**TINY)).state_dict())
    assert {"gene_emb", "cls_token", "value_enc.mask_emb", "value_enc.value_enc.a", "value_enc.value_enc.w1.weight",
            "value_enc.value_enc.w3.weight", "value_enc.value_enc.table.weight"} < keys
    layer = {k[len("encoder.1."):] for k in keys if k.startswith("encoder.1.")}
    assert layer == {f"attn.{p}_proj.weight" for p in "qkvuo"} | {f"ffn.{p}_proj.weight" for p in "uvo"} | {
        f"post_norm{i}.{n}" for i in (1, 2) for n in ("weight", "bias")}


def test_encoder_matches_the_per_head_reference():
    config = tl.CellFMConfig(**TINY)
    model = _perturb(tl.CellFMModel(config))
    ids, values, mask = _batch()
    with torch.no_grad():
        out = model(ids, values, mask).last_hidden_state
    ref = reference(model.state_dict(), ids, values, mask, heads=4, layers=2)
    assert out.shape == (3, 8, 32)
    real = _real(mask)
    assert torch.allclose(out[real].double(), ref[real], atol=1e-4), (out[real].double() - ref[real]).abs().max()


def test_value_mask_puts_mask_emb_in_place_of_the_value():
    model = _perturb(tl.CellFMModel(tl.CellFMConfig(**TINY)))
    ids, values, mask = _batch(1)
    value_mask = torch.zeros_like(mask, dtype=torch.bool)
    value_mask[:, 1] = True
    with torch.no_grad():
        out = model(ids, values, mask, value_mask).last_hidden_state
        changed = values.clone()
        changed[:, 1] += 3.0  # a masked value is not read
        again = model(ids, changed, mask, value_mask).last_hidden_state
        unmasked = model(ids, values, mask).last_hidden_state
    ref = reference(model.state_dict(), ids, values, mask, value_mask, heads=4, layers=2)
    real = _real(mask)
    assert torch.allclose(out[real].double(), ref[real], atol=1e-4)
    assert torch.equal(out, again)
    assert not torch.allclose(out[real], unmasked[real], atol=1e-3)
    with torch.no_grad():  # a 0/1 mask (the release's "unmask" flag inverted) reads as the bool one
        assert torch.equal(model(ids, values, mask, value_mask.long()).last_hidden_state, out)


def test_padding_does_not_change_real_positions():
    model = _perturb(tl.CellFMModel(tl.CellFMConfig(**TINY)))
    ids, values, mask = _batch(2)
    pad = torch.zeros(3, 4, dtype=ids.dtype)
    with torch.no_grad():
        short = model(ids, values, mask).last_hidden_state
        long = model(torch.cat([ids, pad], 1), torch.cat([values, pad.float() + 5.0], 1),
                     torch.cat([mask, pad], 1)).last_hidden_state
    real = _real(mask)
    assert torch.allclose(short[real], long[:, :8][real], atol=1e-5)


def test_leaky_relu_slope_and_eps_are_cellfm_not_torch_defaults():
    model = _perturb(tl.CellFMModel(tl.CellFMConfig(**TINY)))
    ids, values, mask = _batch(3)
    with torch.no_grad():
        out = model(ids, values, mask).last_hidden_state.double()
    torch_defaults = reference(model.state_dict(), ids, values, mask, heads=4, layers=2, eps=1e-5, slope=0.01)
    assert not torch.allclose(out[_real(mask)], torch_defaults[_real(mask)], atol=1e-3)


def test_bad_inputs_are_refused():
    model = tl.CellFMModel(tl.CellFMConfig(**TINY))
    with pytest.raises(ValueError, match=r"gene rows in \[0, 32\)"):
        model(torch.tensor([[1, 40]]), torch.ones(1, 2))
    with pytest.raises(ValueError, match="at most max_genes=12"):
        model(torch.ones(1, 13, dtype=torch.long), torch.ones(1, 13))
    with pytest.raises(ValueError, match="same shape"):
        model(torch.ones(1, 3, dtype=torch.long), torch.ones(1, 2))


def test_gradient_checkpointing_gives_the_same_gradients():
    ids, values, mask = _batch(4)
    grads = []
    for enable in (False, True):
        torch.manual_seed(0)
        model = _perturb(tl.CellFMModel(tl.CellFMConfig(**TINY))).train()
        if enable:
            model.gradient_checkpointing_enable()
        model(ids, values, mask).last_hidden_state[:, 0].sum().backward()
        grads.append(model.encoder[0].attn.q_proj.weight.grad.clone())
    assert torch.allclose(grads[0], grads[1], atol=1e-6)


# ----------------------------------------------------------------------------- heads
@pytest.mark.parametrize("head,keys", [
    ("linear", {"classifier.out.weight", "classifier.out.bias"}),
    ("mlp", {"classifier.dense.weight", "classifier.dense.bias", "classifier.norm.weight", "classifier.norm.bias",
             "classifier.norm.running_mean", "classifier.norm.running_var", "classifier.norm.num_batches_tracked",
             "classifier.out.weight", "classifier.out.bias"}),
])
def test_classifier_reads_the_cls_state(tmp_path, head, keys):
    config = tl.CellFMConfig(**TINY, num_labels=3, classifier_head=head, classifier_hidden_size=8)
    model = _perturb(tl.CellFMForSequenceClassification(config))
    assert {k for k in model.state_dict() if k.startswith("classifier.")} == keys
    ids, values, mask = _batch(5)
    with torch.no_grad():
        out = model(ids, values, mask, labels=torch.tensor([0, 1, 2]))
        cls = tl.CellFMModel.forward(model, ids, values, mask).last_hidden_state[:, 0]
    assert out.logits.shape == (3, 3) and out.loss.ndim == 0
    assert torch.allclose(out.logits, model.classifier(cls))
    model.save_pretrained(tmp_path)
    again = tl.CellFMForSequenceClassification.from_pretrained(tmp_path)
    assert again.loading_info["missing_keys"] == []
    with torch.no_grad():
        assert torch.equal(again(ids, values, mask).logits, out.logits)
    # the backbone alone loads a classifier's folder, dropping the head with a log line
    backbone = tl.CellFMModel.from_pretrained(tmp_path)
    assert sorted(backbone.loading_info["discarded_head_keys"]) == sorted(keys)


def test_mask_values_picks_a_fifth_of_the_real_genes():
    mask = torch.zeros(3, 20, dtype=torch.long)
    mask[0, :20] = 1
    mask[1, :10] = 1
    mask[2, :2] = 1
    picked = mask_values(mask, 0.2, generator=torch.Generator().manual_seed(0))
    assert picked.sum(1).tolist() == [4, 2, 1]
    assert not bool((picked & ~mask.bool()).any())
    again = mask_values(mask, 0.2, generator=torch.Generator().manual_seed(0))
    assert torch.equal(picked, again)


def test_masked_values_loss_is_taken_over_masked_genes_only():
    model = _perturb(tl.CellFMForMaskedValues(tl.CellFMConfig(**TINY))).train()
    ids, values, mask = _batch(6)
    value_mask = mask_values(mask, 0.2, generator=torch.Generator().manual_seed(1))
    out = model(ids, values, mask, value_mask, labels=values)
    assert out.logits.shape == values.shape
    expected = F.mse_loss(out.logits[value_mask], values[value_mask])
    assert torch.allclose(out.loss, expected)
    out.loss.backward()
    assert model.value_head.weight.grad is not None and model.value_enc.mask_emb.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="without value_mask"):
        model(ids, values, mask, labels=values)
