"""``geneformer-peft convert-scbert``: a ``.pth`` in the released layout (made here from a random
performer-pytorch ``PerformerLM`` with scBERT's settings) converts into a folder that loads with
no missing or unexpected key and computes what the reference computes."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

performer_pytorch = pytest.importorskip(
    "performer_pytorch", reason="the released layout is made from performer-pytorch's PerformerLM")

from performer_factories import TINY, reference_lm, released_state_dict, tokens, write_released_pth

import transformerslocal as tl
from geneformer_peft.cli import main


@pytest.fixture()
def released(tmp_path):
    reference = reference_lm(TINY, seed=3)
    state = released_state_dict(reference)
    with torch.no_grad():  # the reference computes with the release's zero extra row too
        reference.pos_emb.emb.weight[-1] = 0.0
    return reference, state, write_released_pth(tmp_path / "panglao_pretrain.pth", state)


def test_released_layout_converts_and_loads_exactly(tmp_path, released):
    reference, state, pth = released
    assert "performer.calls_since_last_redraw" in state and not any("proj_updater" in k for k in state)
    panel = tmp_path / "panel.txt"
    panel.write_text("".join(f"GENE{i}\n" for i in range(TINY["max_seq_len"] - 1)))
    gene2vec = tmp_path / "gene2vec.npy"
    np.save(gene2vec, state["pos_emb.emb.weight"][:-1].numpy())  # float64, as scBERT ships it
    out = tmp_path / "converted"
    assert main(["convert-scbert", "--checkpoint", str(pth), "--output_dir", str(out), "--gene2vec", str(gene2vec),
                 "--gene_panel", str(panel), "--key_stabilizer", "head"]) == 0
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "scbert" and config["architectures"] == ["PerformerForMaskedLM"]
    for key, value in {**TINY, "nb_features": 16, "ff_mult": 4, "qkv_bias": False, "attn_out_bias": True,
                       "key_stabilizer": "head", "pos_embedding": "gene2vec"}.items():
        assert config[key] == value, key
    assert (out / "gene_panel.txt").read_text() == panel.read_text()
    model = tl.PerformerForMaskedLM.from_pretrained(out)
    assert model.loading_info == {"missing_keys": [], "unexpected_keys": [], "discarded_head_keys": [],
                                  "mismatched_keys": []}
    # every released key is in the model under its own name, and nothing else is
    assert set(model.state_dict()) == set(state)
    ids = tokens(3, TINY["max_seq_len"], seed=4)
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, reference(ids), atol=1e-5, rtol=0)


def test_default_stabiliser_is_the_releases(tmp_path, released):
    _, _, pth = released
    assert main(["convert-scbert", "--checkpoint", str(pth), "--output_dir", str(tmp_path / "c")]) == 0
    assert tl.PerformerConfig.from_pretrained(tmp_path / "c").key_stabilizer == "cell"


def test_other_gene2vec_or_panel_length_is_refused(tmp_path, released, caplog):
    _, state, pth = released
    other = tmp_path / "other.npy"
    np.save(other, state["pos_emb.emb.weight"][:-1].numpy() + 0.5)
    assert main(["convert-scbert", "--checkpoint", str(pth), "--output_dir", str(tmp_path / "a"),
                 "--gene2vec", str(other)]) == 2
    assert "--gene2vec differs from the vectors stored in" in caplog.text
    short = tmp_path / "short.txt"
    short.write_text("A\nB\nC\n")
    assert main(["convert-scbert", "--checkpoint", str(pth), "--output_dir", str(tmp_path / "b"),
                 "--gene_panel", str(short)]) == 2
    assert "but 4 positions were asked for (a gene panel of 3)" in caplog.text
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_fine_tuned_release_converts_to_the_classifier(tmp_path):
    clf = tl.PerformerForSequenceClassification(tl.PerformerConfig(**TINY, num_labels=4), warn_random_positions=False)
    state = clf.state_dict()
    pth = write_released_pth(tmp_path / "finetuned.pth", state)
    assert main(["convert-scbert", "--checkpoint", str(pth), "--output_dir", str(tmp_path / "clf"),
                 "--key_stabilizer", "head"]) == 0
    loaded = tl.PerformerForSequenceClassification.from_pretrained(tmp_path / "clf")
    assert loaded.config.num_labels == 4 and loaded.loading_info["missing_keys"] == []
    ids = tokens(2, TINY["max_seq_len"])
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, clf.eval()(ids).logits, atol=1e-6, rtol=0)


def test_performer_pytorch_1_1_4_state_dict_converts(tmp_path):
    reference = reference_lm(TINY, seed=5)
    pth = tmp_path / "pp.pth"
    torch.save(reference.state_dict(), pth)  # a bare state dict with the proj_updater copies
    assert main(["convert-scbert", "--checkpoint", str(pth), "--output_dir", str(tmp_path / "o"),
                 "--key_stabilizer", "head"]) == 0
    model = tl.PerformerForMaskedLM.from_pretrained(tmp_path / "o")
    ids = tokens(2, TINY["max_seq_len"], seed=6)
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, reference(ids), atol=1e-5, rtol=0)


class NotATensor:
    pass


def test_a_pickle_needing_code_is_refused_without_allow_pickle(tmp_path, caplog):
    pth = tmp_path / "odd.pth"
    torch.save({"model_state_dict": {}, "extra": NotATensor()}, pth)
    assert main(["convert-scbert", "--checkpoint", str(pth), "--output_dir", str(tmp_path / "o")]) == 2
    assert "--allow_pickle" in caplog.text
