"""BertConfig: keys round-trip, PEFT defaults and validation, the shipped config.json files."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

import transformerslocal as tl
from bert_factories import tiny_config, tiny_config_kwargs

REPO = Path(__file__).resolve().parents[2]  # tests/transformerslocal/ -> the repository
# The Geneformer V1 method configs; the tiny example checkpoint has its own test.
SHIPPED = sorted(p for p in REPO.glob("Pretrain_ckpts/geneformer-*L-30M*/config.json"))
TINY_EXAMPLE = REPO / "Pretrain_ckpts" / "geneformer-tiny-example"


def through_disk(config: tl.BertConfig, tmp_path: Path) -> tl.BertConfig:
    config.save_pretrained(tmp_path)
    return tl.BertConfig.from_pretrained(tmp_path)


# ----------------------------------------------------------------------------- round trip
def test_every_hf_key_round_trips(tmp_path):
    transformers = pytest.importorskip(
        "transformers", reason="the reference key set is transformers.BertConfig.to_dict()")
    hf = transformers.BertConfig(**tiny_config_kwargs(), id2label={0: "B cell", 1: "T cell", 2: "NK"})
    # every key HF knows (to_dict, not the defaults-stripped to_json_string), as JSON holds it
    hf_dict = json.loads(json.dumps(hf.to_dict()))
    assert len(hf_dict) > 20
    via_dict = tl.BertConfig.from_dict(hf_dict).to_dict()
    via_disk = through_disk(tl.BertConfig.from_dict(hf_dict), tmp_path).to_dict()
    for out in (via_dict, via_disk):
        for key, value in hf_dict.items():
            if key == "label2id" and value is None:
                continue  # HF writes None when only id2label was given; we derive it
            assert key in out, f"key {key!r} lost"
            assert out[key] == value, f"key {key!r}: {out[key]!r} != {value!r}"
    assert via_disk["label2id"] == {"B cell": 0, "T cell": 1, "NK": 2}
    # and HF reads ours back with the same values
    hf_back = transformers.BertConfig.from_pretrained(tmp_path)
    for key in ("vocab_size", "hidden_size", "intermediate_size", "hidden_act", "id2label", "max_position_embeddings"):
        assert getattr(hf_back, key) == getattr(hf, key), key


def test_unknown_keys_kept_verbatim(tmp_path):
    extra = {"architectures": ["BertForMaskedLM"], "transformers_version": "4.33.0",
             "my_note": {"nested": [1, 2.5, None]}, "gradient_checkpointing": False}
    config = tl.BertConfig(**tiny_config_kwargs(), **extra)
    for out in (config.to_dict(), through_disk(config, tmp_path).to_dict(),
                json.loads((tmp_path / "config.json").read_text())):
        for key, value in extra.items():
            assert out[key] == value
    assert config.my_note == {"nested": [1, 2.5, None]}


def test_id2label_keys_are_ints_in_memory_and_strings_on_disk(tmp_path):
    config = tl.BertConfig(**tiny_config_kwargs(), id2label={"0": "B cell", "1": "T cell"})
    assert config.id2label == {0: "B cell", 1: "T cell"}
    assert config.label2id == {"B cell": 0, "T cell": 1}
    assert config.num_labels == 2
    on_disk = json.loads(config.save_pretrained(tmp_path).read_text())
    assert on_disk["id2label"] == {"0": "B cell", "1": "T cell"}
    assert tl.BertConfig.from_pretrained(tmp_path) == config


def test_num_labels_override_replaces_id2label(tmp_path):
    tl.BertConfig(**tiny_config_kwargs(), id2label={0: "a", 1: "b", 2: "c"}).save_pretrained(tmp_path)
    config = tl.BertConfig.from_pretrained(tmp_path, num_labels=5)
    assert config.num_labels == 5
    assert config.id2label == {i: f"LABEL_{i}" for i in range(5)}
    assert config.label2id == {f"LABEL_{i}": i for i in range(5)}
    # the same number keeps the names, as transformers does
    assert tl.BertConfig.from_pretrained(tmp_path, num_labels=3).id2label == {0: "a", 1: "b", 2: "c"}
    # explicit maps win
    config = tl.BertConfig.from_pretrained(tmp_path, num_labels=2, id2label={0: "x", 1: "y"})
    assert config.id2label == {0: "x", 1: "y"}
    # the setter, as HF's
    config.num_labels = 2
    assert config.id2label == {0: "x", 1: "y"}
    config.num_labels = 4
    assert config.id2label == {i: f"LABEL_{i}" for i in range(4)}


def test_num_labels_disagreeing_with_id2label_raises():
    with pytest.raises(ValueError, match=r"'num_labels'.*3"):
        tl.BertConfig(**tiny_config_kwargs(), num_labels=3, id2label={0: "a", 1: "b"})


def test_copy_applies_overrides_and_leaves_original():
    config = tiny_config()
    other = config.copy(prompt_type="lora", lora_r=4)
    assert other.peft_methods == ("lora",) and other.lora_r == 4
    assert config.peft_methods == () and config.lora_r == 8
    assert other != config and config.copy() == config


def test_from_pretrained_missing_config_and_bad_json(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        tl.BertConfig.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match="JSON object"):
        tl.BertConfig.from_pretrained(tmp_path)


# ----------------------------------------------------------------------------- PEFT defaults
def test_peft_defaults_and_resolved_layer_lists():
    config = tl.BertConfig(**tiny_config_kwargs(num_hidden_layers=3))
    assert config.prompt_type == "" and config.peft_methods == ()
    assert config.if_use_prompt is True
    assert (config.lora_r, config.lora_alpha, config.lora_dropout) == (8, 1, 0.0)
    assert config.lora_target_modules == ["query", "value"]
    assert config.num_token == 64
    assert config.adapter_ratio == 0.25 and config.adapter_width == 8
    assert config.mlp_adapter_scale == 0.5
    assert config.freeze_layers == 0
    assert config.classifier_pooling == "first"
    assert config.ia3_target_modules == ["key", "value", "output.dense"]
    assert config.ia3_feedforward_modules == ["output.dense"]
    assert config.n_layers_conf == [1, 0, 0]
    assert config.mlp_adapter_conf == [1, 1, 1]
    assert config.space_adapter_conf == [1, 1, 1]
    # resolved lists are written out, so the file says what the model does
    assert config.to_dict()["n_layers_conf"] == [1, 0, 0]


def test_prompt_type_parsing():
    config = tiny_config(prompt_type=" Gene_token_prompt , lora,lora ")
    assert config.peft_methods == ("Gene_token_prompt", "lora")
    assert config.prompt_type == "Gene_token_prompt,lora"
    assert config.uses("lora") and not config.uses("prefix_prompt")
    assert tiny_config(prompt_type=["encoder_prompt"]).prompt_type == "encoder_prompt"
    switched_off = tiny_config(prompt_type="lora,encoder_prompt", if_use_prompt=False)
    assert switched_off.peft_methods == () and not switched_off.uses("lora")


def test_keys_of_unused_methods_are_not_checked():
    # lora_r 0 and num_token 0 are only errors when the method is used
    config = tiny_config(prompt_type="encoder_prompt", lora_r=0, num_token=0)
    assert config.peft_methods == ("encoder_prompt",)
    assert tiny_config(prompt_type="lora,prefix_prompt", lora_r=0, num_token=0, if_use_prompt=False)


BAD_KEYS = [
    # (overrides, key, value as quoted in the message)
    (dict(prompt_type="lora,LoRA"), "prompt_type", "'lora,LoRA'"),
    (dict(prompt_type="adapter"), "prompt_type", "'adapter'"),
    (dict(prompt_type=3), "prompt_type", "3"),
    (dict(mlp_adapter_conf=[1, 1, 1]), "mlp_adapter_conf", r"\[1, 1, 1\]"),
    (dict(space_adapter_conf=[1]), "space_adapter_conf", r"\[1\]"),
    (dict(n_layers_conf=[1, 0, 0]), "n_layers_conf", r"\[1, 0, 0\]"),
    (dict(n_layers_conf=[1, 2]), "n_layers_conf", r"\[1, 2\]"),
    (dict(prompt_type="prefix_prompt", n_layers_conf=[0, 0]), "n_layers_conf", r"\[0, 0\]"),
    (dict(prompt_type="lora", lora_r=0), "lora_r", "0"),
    (dict(prompt_type="lora", lora_r=-2), "lora_r", "-2"),
    (dict(prompt_type="lora", lora_target_modules=["query", "dense"]), "lora_target_modules", r"\['query', 'dense'\]"),
    (dict(prompt_type="lora", lora_target_modules="query"), "lora_target_modules", "'query'"),
    (dict(prompt_type="lora", lora_dropout=1.0), "lora_dropout", "1.0"),
    (dict(prompt_type="prefix_prompt", num_token=0), "num_token", "0"),
    (dict(prompt_type="dora", lora_r=0), "lora_r", "0"),
    (dict(prompt_type="dora", lora_target_modules=["dense"]), "lora_target_modules", r"\['dense'\]"),
    (dict(prompt_type="dora", lora_alpha=0), "lora_alpha", "0"),
    (dict(prompt_type="ia3", ia3_target_modules=[]), "ia3_target_modules", r"\[\]"),
    (dict(prompt_type="ia3", ia3_target_modules="key"), "ia3_target_modules", "'key'"),
    (dict(prompt_type="ia3", ia3_target_modules=["key", "dense"]), "ia3_target_modules", r"\['key', 'dense'\]"),
    (dict(prompt_type="ia3", ia3_feedforward_modules=["intermediate"]), "ia3_feedforward_modules",
     r"\['intermediate'\]"),
    (dict(prompt_type="ia3", ia3_target_modules=["key", "value"]), "ia3_feedforward_modules",
     r"\['output.dense'\]"),
    (dict(prompt_type="lora,dora"), "prompt_type", "'lora,dora'"),
    (dict(prompt_type="ia3,lora"), "prompt_type", "'ia3,lora'"),
    (dict(prompt_type="Gene_token_prompt", adapter_ratio=0.0), "adapter_ratio", "0.0"),
    (dict(classifier_pooling="max"), "classifier_pooling", "'max'"),
    (dict(freeze_layers=3), "freeze_layers", "3"),
    (dict(freeze_layers=-1), "freeze_layers", "-1"),
    (dict(if_use_prompt="yes"), "if_use_prompt", "'yes'"),
    (dict(hidden_act="sigmoidal"), "hidden_act", "'sigmoidal'"),
    (dict(num_attention_heads=5), "hidden_size", "32"),
    (dict(position_embedding_type="relative_key"), "position_embedding_type", "'relative_key'"),
]


@pytest.mark.parametrize("overrides,key,value", BAD_KEYS, ids=[f"{c[1]}={c[0][c[1]] if c[1] in c[0] else ''}"
                                                               for c in BAD_KEYS])
def test_bad_key_raises_naming_key_and_value(overrides, key, value):
    with pytest.raises(ValueError, match=rf"'{key}'.* value {value}.*expected"):
        tiny_config(**overrides)


def test_lora_and_dora_together_raise_naming_both():
    with pytest.raises(ValueError, match=r"'lora' and 'dora' both replace attention\.self\.query"):
        tiny_config(prompt_type="lora,dora")
    # off, the combination is not checked (nothing is built)
    assert tiny_config(prompt_type="lora,dora", if_use_prompt=False).peft_methods == ()


def test_linear_methods_combine_on_different_projections():
    with pytest.raises(ValueError, match=r"'ia3' and 'lora' both replace attention\.self\.value"):
        tiny_config(prompt_type="ia3,lora")  # defaults: ia3 on key, value, output.dense; lora on query, value
    config = tiny_config(prompt_type="ia3,lora", lora_target_modules=["query"])
    assert config.peft_methods == ("ia3", "lora")
    config = tiny_config(prompt_type="dora,ia3", lora_target_modules=["query"])
    assert config.peft_methods == ("dora", "ia3")


def test_keys_of_new_methods_are_not_checked_when_off():
    assert tiny_config(prompt_type="lora", ia3_target_modules=[], ia3_feedforward_modules="x").peft_methods == ("lora",)


def test_error_names_the_file(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(tiny_config_kwargs(prompt_type="lora", lora_r=0)))
    with pytest.raises(ValueError, match=rf"'lora_r' in {tmp_path}.*config\.json has value 0"):
        tl.BertConfig.from_pretrained(tmp_path)


def test_conf_length_error_allows_what():
    with pytest.raises(ValueError, match=r"a list of 2 zeros and ones.*num_hidden_layers=2"):
        tiny_config(mlp_adapter_conf=[1, 1, 1])
    with pytest.raises(ValueError, match=r"unknown method 'bogus'.*'' means full fine-tuning"):
        tiny_config(prompt_type="lora,bogus")


# ----------------------------------------------------------------------------- shipped configs
V1_SHAPES = {  # docs/peft_keys.md §9: layers -> (hidden, heads, FFN)
    6: (256, 4, 512),
    12: (512, 8, 1024),
}
EXPECTED_METHODS = {  # folder suffix -> prompt_type
    "": (),
    "-lora": ("lora",),
    "-prompt": ("prefix_prompt",),
    "-encoder": ("encoder_prompt",),
    "-gene-token": ("Gene_token_prompt",),
    "-gene-token-lora": ("Gene_token_prompt", "lora"),
    "-ia3": ("ia3",),
    "-dora": ("dora",),
}


def test_shipped_configs_exist():
    assert len(SHIPPED) >= 2, "Pretrain_ckpts/*/config.json not found"


@pytest.mark.parametrize("path", SHIPPED, ids=[p.parent.name for p in SHIPPED])
def test_shipped_config_loads_with_v1_shapes(path):
    config = tl.BertConfig.from_pretrained(path.parent)
    n = config.num_hidden_layers
    assert n in V1_SHAPES, f"{path}: {n} layers"
    assert (config.hidden_size, config.num_attention_heads, config.intermediate_size) == V1_SHAPES[n]
    assert path.parent.name.startswith(f"geneformer-{n}L-")
    assert config.hidden_act == "relu"
    assert config.hidden_dropout_prob == config.attention_probs_dropout_prob == 0.02
    assert config.max_position_embeddings == 2048
    assert config.vocab_size == 25426
    assert config.type_vocab_size == 2 and config.layer_norm_eps == 1e-12 and config.pad_token_id == 0
    assert config.position_embedding_type == "absolute"
    suffix = path.parent.name.split("30M", 1)[1]
    assert config.peft_methods == EXPECTED_METHODS[suffix]
    assert len(config.n_layers_conf) == len(config.mlp_adapter_conf) == len(config.space_adapter_conf) == n
    # written back unchanged
    assert config.to_dict() == json.loads(path.read_text())


def test_tiny_example_checkpoint_is_complete_and_small():
    """The shipped tiny checkpoint: weights, vocabulary, the example's method, a few MB."""
    config = tl.BertConfig.from_pretrained(TINY_EXAMPLE)
    assert config.peft_methods == ("Gene_token_prompt",)
    assert config.classifier_pooling == "mean" and config.attention_probs_dropout_prob == 0.0
    assert config.num_hidden_layers <= 4 and 64 <= config.hidden_size <= 128
    files = {p.name for p in TINY_EXAMPLE.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "token_dictionary.pkl",
            "gene_median_dictionary.pkl"} <= files
    assert sum(p.stat().st_size for p in TINY_EXAMPLE.iterdir()) < 3 * 2**20
    from geneformer_peft.data.vocab import load_token_dictionary
    assert len(load_token_dictionary(TINY_EXAMPLE / "tokenizer.json")) == config.vocab_size


def test_finetune_max_length_is_declared_and_written_only_when_set(tmp_path):
    from transformerslocal import BertConfig

    plain = BertConfig(num_hidden_layers=2, hidden_size=32, num_attention_heads=4)
    assert plain.finetune_max_length is None and "finetune_max_length" not in plain.to_dict()
    tuned = plain.copy(finetune_max_length=256)
    tuned.save_pretrained(tmp_path)
    assert BertConfig.from_pretrained(tmp_path).finetune_max_length == 256
    for bad in (0, -3, 2.5, "256", True):
        with pytest.raises(ValueError, match="finetune_max_length"):
            plain.copy(finetune_max_length=bad)


@pytest.mark.parametrize("cls, key", [("BertConfig", "adapter_width"), ("BertConfig", "peft_methods"),
                                      ("CellFMConfig", "head_dim"), ("CellFMConfig", "deepnorm_alpha"),
                                      ("PerformerConfig", "gene_num"), ("PerformerConfig", "inner_dim")])
def test_a_derived_key_in_a_config_is_refused_naming_it(cls, key):
    """A hand-edited config.json holding a value the config derives (a read-only property) gets a
    ValueError naming the key and the value, not an AttributeError traceback."""
    with pytest.raises(ValueError, match=f"config key '{key}' has value 7; .*derived from the other keys"):
        getattr(tl, cls)(**{key: 7})
