"""Geneformer V2 (issue 15): the shipped V2 configs, which model and which data are V2, the
refusal of V1 data on a V2 model (and the reverse), and <cls> pooling."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

import job_factories as jf
from geneformer_peft.data.cells import EncodedCells
from geneformer_peft.errors import DataError
from geneformer_peft.models.generation import check_data_version, data_version, model_version
import transformerslocal as tl

REPO = Path(__file__).resolve().parents[2]
V2_SHAPES = {"104M": (12, 768, 12, 3072), "316M": (18, 1152, 18, 4608)}


def _suffixes(prefix: str) -> set[str]:
    return {p.name[len(prefix):] for p in (REPO / "Pretrain_ckpts").glob(f"{prefix}*") if (p / "config.json").is_file()}


@pytest.mark.parametrize("size", sorted(V2_SHAPES))
def test_v2_configs_have_the_released_shapes_and_every_v1_method(size):
    prefix = f"geneformer-V2-{size}"
    assert _suffixes(prefix) == _suffixes("geneformer-12L-30M")  # the same method variants as V1
    layers, hidden, heads, inter = V2_SHAPES[size]
    for suffix in _suffixes(prefix):
        folder = REPO / "Pretrain_ckpts" / f"{prefix}{suffix}"
        config = tl.BertConfig.from_pretrained(folder)
        v1 = tl.BertConfig.from_pretrained(REPO / "Pretrain_ckpts" / f"geneformer-12L-30M{suffix}")
        assert (config.num_hidden_layers, config.hidden_size, config.num_attention_heads,
                config.intermediate_size) == (layers, hidden, heads, inter)
        assert config.max_position_embeddings == 4096 and config.vocab_size == 20275
        assert config.hidden_act == "relu"
        assert config.hidden_dropout_prob == config.attention_probs_dropout_prob == 0.1
        assert config.classifier_pooling == "cls" and model_version(config) == "V2"
        assert config.peft_methods == v1.peft_methods
        assert len(config.n_layers_conf) == len(config.mlp_adapter_conf) == len(config.space_adapter_conf) == layers
        assert config.to_dict() == json.loads((folder / "config.json").read_text())


def test_v1_configs_are_v1():
    for folder in (REPO / "Pretrain_ckpts").glob("geneformer-*L-30M*"):
        assert model_version(tl.BertConfig.from_pretrained(folder)) == "V1", folder


def test_model_version_from_config_key_vocabulary_or_pooling():
    assert model_version(tl.BertConfig(vocab_size=10)) == "V1"
    assert model_version(tl.BertConfig(vocab_size=10, geneformer_version=2)) == "V2"
    assert model_version(tl.BertConfig(vocab_size=10, classifier_pooling="cls")) == "V2"
    assert model_version(tl.BertConfig(vocab_size=10), {"<pad>": 0, "<mask>": 1, "<cls>": 2, "<eos>": 3}) == "V2"
    data_vocab = {"<pad>": 0, "<mask>": 1, "<cls>": 2, "<eos>": 3, "G1": 4}
    assert model_version(tl.BertConfig(vocab_size=5), None, data_vocab) == "V2"
    assert model_version(tl.BertConfig(vocab_size=9), None, data_vocab) == "V1"
    with pytest.raises(ValueError, match="geneformer_version='3'"):
        model_version(tl.BertConfig(vocab_size=10, geneformer_version="3"))


def _cells(rows, name="fold 0 train") -> EncodedCells:
    offsets = np.cumsum([0] + [len(r) for r in rows])
    return EncodedCells(np.concatenate([np.asarray(r, dtype=np.int32) for r in rows]), offsets, name=name)


V1_ROWS = [[7, 5, 9, 4], [5, 8, 2], [9, 4, 6, 3]]
V2_ROWS = [[2, 7, 5, 3], [2, 5, 8, 9, 3], [2, 9, 3]]


def test_data_version():
    assert data_version(_cells(V1_ROWS), 2)[0] == "V1"
    assert data_version(_cells(V2_ROWS), 2)[0] == "V2"
    assert data_version(_cells(V1_ROWS + V2_ROWS), 2)[0] == "mixed"


def test_mismatches_are_refused_naming_both():
    v2 = tl.BertConfig(vocab_size=10, geneformer_version=2)
    v1 = tl.BertConfig(vocab_size=10)
    assert check_data_version(_cells(V2_ROWS), v2, model_path="m2") == "V2"
    assert check_data_version(_cells(V1_ROWS), v1, model_path="m1") == "V1"
    with pytest.raises(DataError, match=r"fold 0 train: 3 of 3 cells do not start with <cls> \(id 2\).*V1 data.*m2 "
                                        r"is Geneformer V2"):
        check_data_version(_cells(V1_ROWS), v2, model_path="m2")
    with pytest.raises(DataError, match=r"fold 0 train: every cell starts with <cls>.*V2 data.*m1 is Geneformer V1"):
        check_data_version(_cells(V2_ROWS), v1, model_path="m1")
    # the data's own dictionary names another <cls> id
    vocab = {"<pad>": 0, "<mask>": 1, "<eos>": 3, "<cls>": 7, **{f"G{i}": i + 10 for i in range(5)}}
    with pytest.raises(DataError, match=r"<cls> \(id 7\)"):
        check_data_version(_cells([[7, 1, 3], [7, 4, 3]]), v1, model_path="m1", data_vocabulary=vocab)


def test_cls_pooling_is_token_0():
    torch.manual_seed(0)
    config = tl.BertConfig(vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                           intermediate_size=37, max_position_embeddings=64, num_labels=3)
    model = tl.BertForSequenceClassification(config).eval()
    cls_model = tl.BertForSequenceClassification(config.copy(classifier_pooling="cls")).eval()
    cls_model.load_state_dict(model.state_dict())
    ids = torch.randint(4, 99, (3, 11))
    ids[:, 0] = 2
    torch.testing.assert_close(cls_model(ids).logits, model(ids).logits, rtol=0, atol=0)
    hidden = model.bert(ids).last_hidden_state
    expected = model.classifier(model.bert.pooler.activation(model.bert.pooler.dense(hidden[:, 0])))
    torch.testing.assert_close(cls_model(ids).logits, expected)


@pytest.fixture(scope="module")
def v2_job(tmp_path_factory):
    """V2-tokenized tiny data (<cls> ... <eos>) in the fold layout and a tiny V2 checkpoint."""
    from geneformer_peft.data.folds import split_folds
    from geneformer_peft.data.rank_value import tokenize_anndata
    from geneformer_peft.data.synthetic import generate_counts
    from geneformer_peft.data.vocab import build_vocabulary, save_tokenizer_json

    root = tmp_path_factory.mktemp("v2")
    adata = generate_counts(n_cells=60, n_genes=120, n_cell_types=2, seed=1)
    vocab, medians = build_vocabulary(adata, model_version="V2", show_progress=False)
    cells = tokenize_anndata(adata, token_dictionary=vocab, gene_median_dictionary=medians, label_column="cell_type",
                             model_input_size=48, model_version="V2", show_progress=False)
    split_folds(cells, dataset_name="v2", output_dir=root / "folds", n_folds=2, label_column="cell_type", seed=0,
                val_fraction=0.2)
    model = jf.make_tiny_checkpoint(root / "ckpt", vocab_size=len(vocab), max_position_embeddings=48,
                                    geneformer_version=2, classifier_pooling="cls")
    save_tokenizer_json(vocab, model)
    return root, model


def _argv(data_path, name, model, out):
    return ["--dataset_name", name, "--data_path", str(data_path), "--model_path", str(model), "--output_path",
            str(out), "--folds", "0", "--prompt_type", "lora", *jf.FAST_FLAGS, "--epoch", "1"]


def test_job_runs_v2_data_on_a_v2_model_and_refuses_v1_data(v2_job, job_data, tmp_path, caplog):
    root, model = v2_job
    assert jf.run_finetune(_argv(root / "folds", "v2", model, tmp_path / "ok")) == 0
    v2_model = jf.make_tiny_checkpoint(tmp_path / "v2", vocab_size=len(job_data.token_dictionary),
                                       max_position_embeddings=64, geneformer_version=2, classifier_pooling="cls")
    status = jf.run_finetune(_argv(job_data.data_path, job_data.dataset_name, v2_model, tmp_path / "bad"))
    assert status == 2
    assert any("is Geneformer V2" in r.getMessage() and "V1 data" in r.getMessage() for r in caplog.records)


def test_job_refuses_v2_data_on_a_v1_model(v2_job, tmp_path, caplog):
    root, _ = v2_job
    from geneformer_peft.data.folds import load_fold

    train, _, _ = load_fold(root / "folds", "v2", 0)
    top = max(max(ids) for ids in train["input_ids"])
    v1_model = jf.make_tiny_checkpoint(tmp_path / "v1", vocab_size=top + 1, max_position_embeddings=48)
    assert jf.run_finetune(_argv(root / "folds", "v2", v1_model, tmp_path / "bad")) == 2
    assert any("is Geneformer V1" in r.getMessage() and "V2 data" in r.getMessage() for r in caplog.records)
