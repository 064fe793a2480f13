"""Our scBERT model on its own: loading/saving, heads, the gene2vec embedding, PEFT hook points,
gradient checkpointing, bf16 autocast and feed-forward chunks."""
from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from performer_factories import TINY, perturb_, tokens

import transformerslocal as tl
from transformerslocal.modeling_performer import LINEAR_PATHS, fixed_random_gene_vectors


def tiny(cls=tl.PerformerForMaskedLM, seed: int = 0, **overrides):
    torch.manual_seed(seed)
    model = cls(tl.PerformerConfig(**{**TINY, **overrides}), warn_random_positions=False)
    return perturb_(model, seed).eval()


# ----------------------------------------------------------------------------- saving / loading
@pytest.mark.parametrize("safe", [True, False], ids=["safetensors", "bin"])
def test_save_load_round_trip(tmp_path, safe):
    model = tiny()
    model.save_pretrained(tmp_path, safe_serialization=safe)
    assert (tmp_path / ("model.safetensors" if safe else "pytorch_model.bin")).is_file()
    loaded = tl.PerformerForMaskedLM.from_pretrained(tmp_path)
    assert loaded.config.architectures == ["PerformerForMaskedLM"]
    ids = tokens(2, TINY["max_seq_len"])
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)
    assert set(loaded.state_dict()) == set(model.state_dict())


def test_pretrained_checkpoint_into_classifier_drops_the_mlm_head(tmp_path, caplog):
    tiny().save_pretrained(tmp_path)
    with caplog.at_level(logging.INFO):
        clf = tl.PerformerForSequenceClassification.from_pretrained(tmp_path, num_labels=3)
    info = clf.loading_info
    assert info["discarded_head_keys"] == ["to_out.bias", "to_out.weight"]
    assert {k.split(".")[1] for k in info["missing_keys"]} == {"conv1", "fc1", "fc2", "fc3"}
    logits = clf(tokens(4, TINY["max_seq_len"])).logits
    assert logits.shape == (4, 3)
    # a classifier of another label set: a clear error unless asked to re-initialise
    clf.save_pretrained(tmp_path / "clf")
    with pytest.raises(ValueError, match="to_out.fc3.weight: checkpoint \\(3, 128\\), model \\(5, 128\\)"):
        tl.PerformerForSequenceClassification.from_pretrained(tmp_path / "clf", num_labels=5)
    again = tl.PerformerForSequenceClassification.from_pretrained(tmp_path / "clf", num_labels=5,
                                                                  ignore_mismatched_sizes=True)
    assert again.to_out.fc3.out_features == 5


def test_unexpected_keys_are_an_error(tmp_path):
    tiny(depth=3).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=r"performer\.net\.layers\.\{2\}"):
        tl.PerformerForMaskedLM.from_pretrained(tmp_path, depth=2)


def test_classification_head_is_scberts():
    clf = tiny(tl.PerformerForSequenceClassification, num_labels=4)
    head = clf.to_out
    assert tuple(head.conv1.weight.shape) == (1, 1, 1, TINY["dim"])
    assert (head.fc1.in_features, head.fc1.out_features, head.fc2.out_features, head.fc3.out_features) == (
        TINY["max_seq_len"], 512, 128, 4)
    ids = tokens(3, TINY["max_seq_len"])
    with torch.no_grad():
        x = clf.encode(ids).last_hidden_state
        conv = torch.relu(head.conv1(x[:, None])).flatten(1)  # the Conv2d as scBERT runs it
        expected = head.fc3(torch.relu(head.fc2(torch.relu(head.fc1(conv)))))
        torch.testing.assert_close(clf(ids).logits, expected, atol=1e-5, rtol=0)
    loss = clf(ids, labels=torch.tensor([0, 3, 1])).loss
    assert torch.isfinite(loss)


def test_mlm_loss_ignores_the_mask_token_label_and_minus_100():
    model = tiny()
    ids = tokens(2, TINY["max_seq_len"], seed=1)
    labels = torch.full_like(ids, 6)  # bin_num + 1: ignored
    labels[0, 3], labels[1, 7], labels[1, 9] = 2, 0, 5
    with torch.no_grad():
        logits = model(ids).logits
        expected = torch.nn.functional.cross_entropy(logits[[0, 1, 1], [3, 7, 9]], torch.tensor([2, 0, 5]))
        torch.testing.assert_close(model(ids, labels=labels).loss, expected)
        torch.testing.assert_close(model.masked_lm_loss(ids, labels), expected)
        labels[labels == 6] = -100
        torch.testing.assert_close(model(ids, labels=labels).loss, expected)


def test_too_long_input_names_max_seq_len():
    with pytest.raises(ValueError, match="at most max_seq_len=37"):
        tiny()(tokens(1, 38))


# ----------------------------------------------------------------------------- gene2vec
def test_gene2vec_is_frozen_with_a_zero_extra_row(caplog):
    vectors = np.random.default_rng(0).normal(size=(TINY["max_seq_len"] - 1, TINY["dim"])).astype(np.float32)
    with caplog.at_level(logging.WARNING):
        model = tl.PerformerModel(tl.PerformerConfig(**TINY), gene2vec=vectors)
    assert "no gene2vec" not in caplog.text
    table = model.pos_emb.emb.weight
    assert torch.equal(table[:-1], torch.from_numpy(vectors)) and torch.equal(table[-1], torch.zeros(TINY["dim"]))
    assert "pos_emb.emb.weight" not in dict(model.named_parameters())  # a buffer: never trained
    assert "pos_emb.emb.weight" in model.state_dict()
    ids = tokens(1, TINY["max_seq_len"])
    expected = model.token_emb(ids) + table
    torch.testing.assert_close(model.embed(ids), expected)
    with pytest.raises(ValueError, match=r"expected \(36, 32\)"):
        tl.PerformerModel(tl.PerformerConfig(**TINY), gene2vec=vectors[:-1])


def test_without_gene2vec_a_fixed_random_embedding_and_a_warning(caplog):
    config = tl.PerformerConfig(**TINY)
    with caplog.at_level(logging.WARNING):
        a = tl.PerformerModel(config)
    assert "no gene2vec vectors given" in caplog.text
    b = tl.PerformerModel(config, warn_random_positions=False)
    assert torch.equal(a.pos_emb.emb.weight, b.pos_emb.emb.weight)
    assert torch.equal(a.pos_emb.emb.weight[:-1], fixed_random_gene_vectors(config))
    other = tl.PerformerModel(config.copy(pos_embedding_seed=1), warn_random_positions=False)
    assert not torch.equal(a.pos_emb.emb.weight, other.pos_emb.emb.weight)
    none = tl.PerformerModel(config.copy(pos_embedding="none"))
    assert none.pos_emb is None and "pos_emb.emb.weight" not in none.state_dict()


# ----------------------------------------------------------------------------- PEFT hook points
class Scale(torch.nn.Module):
    def __init__(self, factor: float) -> None:
        super().__init__()
        self.factor = factor

    def forward(self, x):
        return self.factor * x


def test_hook_points_apply_where_documented():
    model = tiny()
    ids = tokens(2, TINY["max_seq_len"], seed=2)
    with torch.no_grad():
        base_embed = model.embed(ids)
        model.adapter = Scale(0.5)
        torch.testing.assert_close(model.embed(ids), 1.5 * base_embed)
        layer = model.performer.net.layers[1]
        x = torch.randn(2, TINY["max_seq_len"], TINY["dim"])
        attn_block, ff_block = layer[0], layer[1]
        a = attn_block.fn(attn_block.norm(x))
        layer.Space_Adapter = Scale(2.0)
        layer.MLP_Adapter = Scale(-1.0)
        h = x + 3.0 * a
        n = ff_block.norm(h)
        torch.testing.assert_close(layer(x), h + ff_block.fn(n) - n)
    # a projection is called as a module: replaced (as a PEFT method does), its output is used
    attention = model.performer.net.layers[0].attention
    attention.to_v = torch.nn.Sequential(attention.to_v, Scale(0.0))
    with torch.no_grad():
        y = torch.randn(1, TINY["max_seq_len"], TINY["dim"])
        torch.testing.assert_close(attention(y), attention.to_out.bias.expand_as(y))
    # every linear path names a linear of each layer
    for layer in tiny().performer.net.layers:
        for path in LINEAR_PATHS:
            assert isinstance(layer.get_submodule(path), torch.nn.Linear), path
    assert layer.attention is layer[0].fn and layer.feed_forward is layer[1].fn.fn


# ----------------------------------------------------------------------------- long panels
def test_gradient_checkpointing_gives_the_same_gradients():
    model = tiny(attn_dropout=0.1, ff_dropout=0.1).train()
    model.performer.fix_projection_matrices_()
    ids, target = tokens(2, TINY["max_seq_len"], seed=3), tokens(2, TINY["max_seq_len"], seed=4)

    def grads():
        model.zero_grad()
        torch.manual_seed(7)
        torch.nn.functional.cross_entropy(model(ids).logits.transpose(1, 2), target).backward()
        return {k: p.grad.clone() for k, p in model.named_parameters()}

    plain = grads()
    model.gradient_checkpointing_enable()
    checkpointed = grads()
    for key in plain:
        torch.testing.assert_close(checkpointed[key], plain[key], atol=1e-6, rtol=1e-5, msg=lambda m, k=key: f"{k}: {m}")


def test_feed_forward_chunks_give_the_same_numbers():
    model = tiny()
    chunked = tiny(ff_chunks=4)
    chunked.load_state_dict(model.state_dict())
    ids = tokens(2, TINY["max_seq_len"], seed=5)
    with torch.no_grad():
        torch.testing.assert_close(chunked(ids).logits, model(ids).logits, atol=1e-6, rtol=0)


def test_bf16_autocast_is_close_to_float32_and_trains():
    model = tiny()
    ids = tokens(2, TINY["max_seq_len"], seed=6)
    with torch.no_grad():
        full = model(ids).logits
        with torch.autocast("cpu", dtype=torch.bfloat16):
            half = model(ids).logits
    assert half.dtype == torch.bfloat16
    assert (half.float() - full).abs().max() < 0.1 * full.abs().max()
    model.train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(ids, labels=tokens(2, TINY["max_seq_len"], seed=7)).loss
    loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_cell_stabiliser_does_not_depend_on_batch_mates():
    model = tiny(key_stabilizer="cell")
    ids = tokens(3, TINY["max_seq_len"], seed=8)
    with torch.no_grad():
        batched = model(ids).logits
        alone = torch.cat([model(ids[i:i + 1]).logits for i in range(3)])
    torch.testing.assert_close(batched, alone, atol=1e-6, rtol=0)
