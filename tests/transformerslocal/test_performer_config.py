"""PerformerConfig: scBERT's defaults, derived sizes, checks, and config.json round trips."""
from __future__ import annotations

import json

import pytest

import transformerslocal as tl
from transformerslocal.configuration_bert import BertConfig


def test_defaults_are_the_released_scbert():
    config = tl.PerformerConfig()
    assert config.model_type == "scbert"
    assert (config.num_tokens, config.max_seq_len, config.dim, config.depth, config.heads, config.dim_head) == (
        7, 16907, 200, 6, 10, 64)
    assert config.nb_features == 266  # int(64 * ln 64), resolved as performer-pytorch does
    assert (config.bin_num, config.mask_token_id, config.gene_num, config.inner_dim) == (5, 6, 16906, 640)
    assert (config.feature_redraw_interval, config.qkv_bias, config.attn_out_bias, config.local_attn_heads) == (
        1000, False, True, 0)
    assert (config.hidden_size, config.num_hidden_layers, config.num_attention_heads) == (200, 6, 10)


def test_round_trip_keeps_unknown_keys(tmp_path):
    config = tl.PerformerConfig(dim=32, depth=2, heads=4, dim_head=8, max_seq_len=37, num_labels=3,
                                prompt_type="lora", some_future_key={"a": [1, 2]})
    config.save_pretrained(tmp_path)
    data = json.loads((tmp_path / "config.json").read_text())
    assert data["model_type"] == "scbert" and data["some_future_key"] == {"a": [1, 2]}
    assert data["prompt_type"] == "lora" and data["nb_features"] == 16
    again = tl.PerformerConfig.from_pretrained(tmp_path)
    assert again == config and again.num_labels == 3
    assert again.copy(num_labels=5).num_labels == 5
    assert again.copy(num_labels=3).id2label == config.id2label


@pytest.mark.parametrize("key,value,expected", [
    ("depth", 0, "an integer >= 1"),
    ("nb_features", 0, "an integer >= 1"),
    ("local_attn_heads", 2, "scBERT's setting"),
    ("generalized_attention", True, "scBERT's setting"),
    ("key_stabilizer", "batch", "one of ['head', 'cell']"),
    ("pos_embedding", "rotary", "one of ['gene2vec', 'none']"),
    ("attn_dropout", 1.0, "a number in [0, 1)"),
    ("feature_redraw_interval", -1, "an integer >= 0"),
    ("classifier_hidden_sizes", [512], "a list of two integers"),
    ("hidden_size", 64, "it reads 'dim'"),
    ("gene_num", 16, "derived from the other keys"),
])
def test_bad_values_name_key_value_and_expectation(key, value, expected):
    with pytest.raises(ValueError, match="config key '" + key + "'") as err:
        tl.PerformerConfig(**{key: value})
    assert expected in str(err.value) and repr(value) in str(err.value)


def test_a_bert_config_is_not_read_as_a_performer(tmp_path):
    BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="model_type is 'bert'; expected 'scbert'"):
        tl.PerformerConfig.from_pretrained(tmp_path)
