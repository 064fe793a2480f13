"""The model family from the checkpoint's config.json (geneformer_peft/models/families.py):
loading, `predict` on a tiny scBERT fold (full weights and PEFT weights on a base), fixed-length
input checks, and `--unassign_threshold` for both families."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch
from datasets import Dataset

import transformerslocal as tl
from geneformer_peft import cli
from geneformer_peft.evaluation.prediction import UNASSIGNED, predict_cells
from geneformer_peft.models.families import family_of
from geneformer_peft.models.loading import load_classifier, load_fold_model, resolve_config
from transformerslocal.peft import mark_trainable, save_peft_weights

LABELS = ["B", "T", "NK"]
SIZES = dict(num_tokens=7, max_seq_len=41, dim=32, depth=2, heads=4, dim_head=8, feature_redraw_interval=None,
             classifier_hidden_sizes=[16, 8])


def _perturb(model, seed=0):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.3)
    return model


def scbert_fold(directory, **config):
    torch.manual_seed(0)
    cfg = tl.PerformerConfig(**SIZES, id2label=dict(enumerate(LABELS)), **config)
    model = _perturb(tl.PerformerForSequenceClassification(cfg, warn_random_positions=False))
    model.save_pretrained(directory)
    return model.eval()


def binned_cells(n=12, length=SIZES["max_seq_len"], seed=0):
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, 6, size=(n, length)).astype(np.uint8)
    ids[:, -1] = 0
    return Dataset.from_dict({"input_ids": [row.tolist() for row in ids],
                              "cell_type": [LABELS[i % 3] for i in range(n)]}), ids


def test_family_from_config_json(tmp_path):
    scbert_fold(tmp_path / "s")
    assert family_of(tmp_path / "s").classifier_class is tl.PerformerForSequenceClassification
    bert = tl.BertForSequenceClassification(tl.BertConfig(vocab_size=20, hidden_size=32, num_hidden_layers=1,
                                                          num_attention_heads=4, intermediate_size=37))
    bert.save_pretrained(tmp_path / "b")
    assert family_of(tmp_path / "b").classifier_class is tl.BertForSequenceClassification
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    with pytest.raises(ValueError, match="gpt2"):
        family_of(tmp_path / "x")


def test_resolve_config_and_load_classifier_for_scbert(tmp_path):
    mlm = tl.PerformerForMaskedLM(tl.PerformerConfig(**SIZES), warn_random_positions=False)
    mlm.save_pretrained(tmp_path / "base")
    method = tmp_path / "method.json"  # a BERT-family method file, as the example ships
    method.write_text(json.dumps({"model_type": "bert", "hidden_size": 512, "prompt_type": "lora", "lora_r": 2,
                                  "mlp_adapter_conf": [1] * 12}))
    config = resolve_config(tmp_path / "base", config_path=method, label2id={n: i for i, n in enumerate(LABELS)})
    assert isinstance(config, tl.PerformerConfig)
    assert config.prompt_type == "lora" and config.lora_r == 2 and config.mlp_adapter_conf == [1, 1]
    model = load_classifier(tmp_path / "base", config)
    assert isinstance(model, tl.PerformerForSequenceClassification) and model.config.num_labels == 3
    assert torch.equal(model.token_emb.weight, mlm.token_emb.weight)
    same = tmp_path / "same.json"
    same.write_text(json.dumps({"model_type": "scbert", **SIZES, "dim": 64, "prompt_type": "ia3"}))
    with pytest.raises(ValueError, match="dim=64"):
        resolve_config(tmp_path / "base", config_path=same)


def test_predict_scbert_fold_and_unassign_threshold(tmp_path):
    model = scbert_fold(tmp_path / "fold")
    dataset, ids = binned_cells()
    dataset.save_to_disk(str(tmp_path / "cells.dataset"))
    out = tmp_path / "preds.csv"
    assert cli.main(["predict", "--model_path", str(tmp_path / "fold"), "--input", str(tmp_path / "cells.dataset"),
                     "--output", str(out)]) == 0
    frame = pd.read_csv(out)
    with torch.no_grad():
        probs = torch.softmax(model(torch.as_tensor(ids, dtype=torch.long)).logits, -1).numpy()
    np.testing.assert_allclose(frame[[f"prob_{n}" for n in LABELS]].to_numpy(), probs, atol=1e-6)
    assert list(frame["pred_celltype"]) == [LABELS[i] for i in probs.argmax(1)]
    threshold = float(np.median(probs.max(1)))
    out2 = tmp_path / "preds_unassigned.csv"
    assert cli.main(["predict", "--model_path", str(tmp_path / "fold"), "--input", str(tmp_path / "cells.dataset"),
                     "--output", str(out2), "--unassign_threshold", str(threshold)]) == 0
    got = pd.read_csv(out2)
    below = probs.max(1) < threshold
    assert 0 < below.sum() < len(below)
    assert (got.loc[below, "pred_celltype"] == UNASSIGNED).all() and (got.loc[below, "pred_cellcode"] == -1).all()
    pd.testing.assert_frame_equal(got.loc[~below], frame.loc[~below])


def test_predict_scbert_peft_fold_on_base(tmp_path):
    base = tl.PerformerForMaskedLM(tl.PerformerConfig(**SIZES), warn_random_positions=False)
    _perturb(base, 3).save_pretrained(tmp_path / "base")
    config = tl.PerformerConfig(**SIZES, id2label=dict(enumerate(LABELS)), prompt_type="lora,encoder_prompt")
    model = tl.PerformerForSequenceClassification(config, warn_random_positions=False)
    model.load_checkpoint_state(base.state_dict(), report_missing=False)
    mark_trainable(model)
    _perturb(model, 4)
    save_peft_weights(model, tmp_path / "fold")
    loaded = load_fold_model(tmp_path / "fold", tmp_path / "base")
    dataset, ids = binned_cells(5)
    x = torch.as_tensor(ids, dtype=torch.long)
    with torch.no_grad():
        assert torch.equal(loaded(x).logits, model.eval()(x).logits)
    frame, metrics = predict_cells(tmp_path / "fold", dataset, base_model=tmp_path / "base")
    assert len(frame) == 5 and 0.0 <= metrics["accuracy"] <= 1.0


def test_predict_refuses_cells_of_another_panel(tmp_path):
    scbert_fold(tmp_path / "fold")
    dataset, _ = binned_cells(4, length=SIZES["max_seq_len"] - 3)
    dataset.save_to_disk(str(tmp_path / "short.dataset"))
    status = cli.main(["predict", "--model_path", str(tmp_path / "fold"), "--input", str(tmp_path / "short.dataset"),
                       "--output", str(tmp_path / "p.csv")])
    assert status == 2  # DataError


def test_unassign_threshold_for_bert(tmp_path):
    torch.manual_seed(0)
    config = tl.BertConfig(vocab_size=30, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                           intermediate_size=37, max_position_embeddings=16, id2label=dict(enumerate(LABELS)))
    _perturb(tl.BertForSequenceClassification(config)).save_pretrained(tmp_path / "fold")
    rng = np.random.default_rng(1)
    dataset = Dataset.from_dict({"input_ids": [rng.integers(1, 30, size=int(n)).tolist()
                                               for n in rng.integers(3, 12, size=10)],
                                 "cell_type": [LABELS[i % 3] for i in range(10)]})
    plain, _ = predict_cells(tmp_path / "fold", dataset)
    threshold = float(np.median(plain["confidence"]))
    frame, _ = predict_cells(tmp_path / "fold", dataset, unassign_threshold=threshold, output=tmp_path / "p.csv")
    below = plain["confidence"].to_numpy() < threshold
    assert below.any() and (frame.loc[below, "pred_celltype"] == UNASSIGNED).all()
    assert (frame.loc[~below, "pred_celltype"] == plain.loc[~below, "pred_celltype"]).all()
    assert (pd.read_csv(tmp_path / "p.csv")["pred_celltype"] == frame["pred_celltype"]).all()
    with pytest.raises(ValueError, match="unassign_threshold"):
        predict_cells(tmp_path / "fold", dataset, unassign_threshold=1.5)
