"""from_pretrained / save_pretrained: what loads where, what is reported, what is refused.

Checkpoints are written by our own models (both formats: ``model.safetensors`` and the
HF 4.x ``pytorch_model.bin`` with the tied ``cls.predictions.decoder.*`` keys); parity
with ``transformers`` itself is in test_bert_parity.py.
"""
from __future__ import annotations

import json
import logging
import re

import pytest
import torch
from safetensors.torch import load_file, save_file

import transformerslocal as tl
from bert_factories import TINY_CONFIG, ours_tiny_model, padded_batch, perturb_, tiny_config

LOGGER = "transformerslocal.modeling_utils"
FORMATS = pytest.mark.parametrize("safe", [True, False], ids=["safetensors", "bin"])


def weights_file(directory, safe: bool):
    return directory / ("model.safetensors" if safe else "pytorch_model.bin")


def read_weights(directory, safe: bool) -> dict[str, torch.Tensor]:
    file = weights_file(directory, safe)
    return load_file(str(file)) if safe else torch.load(file, weights_only=True)


def write_weights(directory, state: dict[str, torch.Tensor], safe: bool) -> None:
    state = {k: v.detach().clone().contiguous() for k, v in state.items()}
    if safe:
        save_file(state, str(weights_file(directory, True)))
    else:
        torch.save(state, weights_file(directory, False))


def assert_state_equal(a: dict, b: dict, keys=None) -> None:
    keys = sorted(a) if keys is None else keys
    for key in keys:
        assert torch.equal(a[key], b[key]), key


def loading_records(caplog):
    return [r for r in caplog.records if r.name == LOGGER and r.getMessage().startswith("loaded ")]


# ----------------------------------------------------------------------------- heads
@FORMATS
def test_mlm_checkpoint_as_classifier_reports_new_and_discarded_keys_once(tmp_path, caplog, safe):
    mlm = ours_tiny_model("BertForMaskedLM")
    mlm.save_pretrained(tmp_path, safe_serialization=safe)
    with caplog.at_level(logging.INFO, logger=LOGGER):
        model = tl.BertForSequenceClassification.from_pretrained(tmp_path, num_labels=3)
    records = loading_records(caplog)
    assert len(records) == 1, [r.getMessage() for r in records]
    assert records[0].levelno == logging.INFO  # a new head is expected, not a warning
    message = records[0].getMessage()
    for key in ("bert.pooler.dense.weight", "bert.pooler.dense.bias", "classifier.weight", "classifier.bias"):
        assert key in message
    assert "newly initialised" in message and "another head" in message
    for key in ("cls.predictions.bias", "cls.predictions.transform.dense.weight"):
        assert key in message
    info = model.loading_info
    assert info["missing_keys"] == ["bert.pooler.dense.bias", "bert.pooler.dense.weight",
                                    "classifier.bias", "classifier.weight"]
    assert info["unexpected_keys"] == [] and info["mismatched_keys"] == []
    assert info["discarded_head_keys"] and all(k.startswith("cls.") for k in info["discarded_head_keys"])
    assert_state_equal(model.bert.state_dict(), mlm.bert.state_dict(), keys=sorted(mlm.bert.state_dict()))
    assert model.classifier.weight.shape == (3, TINY_CONFIG["hidden_size"])


def test_new_backbone_weights_are_a_warning(tmp_path, caplog):
    model = ours_tiny_model("BertModel")
    state = model.state_dict()
    del state["encoder.layer.1.output.dense.weight"]
    model.config.save_pretrained(tmp_path)
    write_weights(tmp_path, state, safe=True)
    with caplog.at_level(logging.INFO, logger=LOGGER):
        loaded = tl.BertModel.from_pretrained(tmp_path)
    (record,) = loading_records(caplog)
    assert record.levelno == logging.WARNING
    assert "encoder.layer.{1}.output.dense.weight" in record.getMessage()
    assert loaded.loading_info["missing_keys"] == ["encoder.layer.1.output.dense.weight"]


def test_wrong_size_classifier_needs_ignore_mismatched_sizes(tmp_path):
    three = ours_tiny_model("BertForSequenceClassification", num_labels=3)
    three.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=r"classifier\.weight: checkpoint \(3, 32\), model \(5, 32\).*"
                                         r"ignore_mismatched_sizes=True"):
        tl.BertForSequenceClassification.from_pretrained(tmp_path, num_labels=5)
    five = tl.BertForSequenceClassification.from_pretrained(tmp_path, num_labels=5, ignore_mismatched_sizes=True)
    assert five.classifier.weight.shape == (5, 32) and five.config.num_labels == 5
    mismatched = {k: (a, b) for k, a, b in five.loading_info["mismatched_keys"]}
    assert mismatched == {"classifier.weight": ((3, 32), (5, 32)), "classifier.bias": ((3,), (5,))}
    assert five.loading_info["missing_keys"] == []  # in the checkpoint, with another shape: not "missing"
    # the backbone and the pooler still come from the checkpoint; the classifier is fresh
    assert_state_equal(five.bert.state_dict(), three.bert.state_dict())
    assert torch.count_nonzero(five.classifier.bias) == 0  # HF init: zero bias (the saved one was perturbed)
    assert five.classifier.weight.std() < 0.05


@FORMATS
def test_unexpected_backbone_keys_raise_unless_ignored(tmp_path, safe):
    model = ours_tiny_model("BertForSequenceClassification")
    state = model.state_dict()
    state["bert.encoder.layer.5.attention.self.query.weight"] = torch.zeros(32, 32)
    state["bert.encoder.layer.5.output.dense.bias"] = torch.zeros(32)
    model.config.save_pretrained(tmp_path)
    write_weights(tmp_path, state, safe)
    with pytest.raises(ValueError, match=r"2 keys.*bert\.encoder\.layer\.\{5\}\.attention\.self\.query\.weight.*"
                                         r"bert\.encoder\.layer\.\{5\}\.output\.dense\.bias.*ignore_unexpected_keys=True"):
        tl.BertForSequenceClassification.from_pretrained(tmp_path)
    loaded = tl.BertForSequenceClassification.from_pretrained(tmp_path, ignore_unexpected_keys=True)
    assert loaded.loading_info["unexpected_keys"] == ["bert.encoder.layer.5.attention.self.query.weight",
                                                      "bert.encoder.layer.5.output.dense.bias"]
    assert "bert.encoder.layer.5.output.dense.bias" not in loaded.state_dict()
    assert_state_equal(loaded.state_dict(), model.state_dict())


def test_peft_keys_into_a_plain_model_are_unexpected(tmp_path):
    lora = ours_tiny_model("BertForSequenceClassification", prompt_type="lora")
    lora.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=r"lora_A.*prompt_type"):
        tl.BertForSequenceClassification.from_pretrained(tmp_path, prompt_type="")


# ----------------------------------------------------------------------------- files
def test_safetensors_preferred_over_bin(tmp_path):
    model = ours_tiny_model("BertForMaskedLM", seed=0)
    other = ours_tiny_model("BertForMaskedLM", seed=1)
    model.save_pretrained(tmp_path, safe_serialization=True)
    other.save_pretrained(tmp_path, safe_serialization=False)
    assert (tmp_path / "model.safetensors").is_file() and (tmp_path / "pytorch_model.bin").is_file()
    loaded = tl.BertForMaskedLM.from_pretrained(tmp_path)
    assert_state_equal(loaded.state_dict(), model.state_dict())
    assert not torch.equal(loaded.bert.embeddings.word_embeddings.weight, other.bert.embeddings.word_embeddings.weight)
    (tmp_path / "model.safetensors").unlink()
    assert_state_equal(tl.BertForMaskedLM.from_pretrained(tmp_path).state_dict(), other.state_dict())


def test_folder_without_weights_lists_names_looked_for(tmp_path):
    tiny_config().save_pretrained(tmp_path)
    with pytest.raises(FileNotFoundError) as err:
        tl.BertModel.from_pretrained(tmp_path)
    message = str(err.value)
    for name in ("model.safetensors", "pytorch_model.bin", "model.safetensors.index.json",
                 "pytorch_model.bin.index.json"):
        assert name in message
    assert str(tmp_path) in message
    with pytest.raises(FileNotFoundError, match="does not exist"):
        tl.BertModel.from_pretrained(tmp_path / "nowhere")


def test_sharded_checkpoint_loads(tmp_path):
    model = ours_tiny_model("BertForSequenceClassification")
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    names = sorted(state)
    shards = {"model-00001-of-00002.safetensors": names[: len(names) // 2],
              "model-00002-of-00002.safetensors": names[len(names) // 2:]}
    weight_map = {}
    for shard, keys in shards.items():
        save_file({k: state[k] for k in keys}, str(tmp_path / shard))
        weight_map.update({k: shard for k in keys})
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    model.config.save_pretrained(tmp_path)
    # a single .bin beside the shards loses to them: safetensors first, as in HF
    ours_tiny_model("BertForSequenceClassification", seed=1).save_pretrained(tmp_path, safe_serialization=False)
    assert_state_equal(tl.BertForSequenceClassification.from_pretrained(tmp_path).state_dict(), state)


# ----------------------------------------------------------------------------- prefixes and old names
@pytest.mark.parametrize("head", ["BertForMaskedLM", "BertForSequenceClassification"])
def test_bert_model_loads_headed_checkpoint(tmp_path, head):
    headed = ours_tiny_model(head)
    headed.save_pretrained(tmp_path)
    model = tl.BertModel.from_pretrained(tmp_path)
    own = model.state_dict()
    if head == "BertForMaskedLM":  # no pooler in an MLM checkpoint
        assert model.loading_info["missing_keys"] == ["pooler.dense.bias", "pooler.dense.weight"]
        own = {k: v for k, v in own.items() if not k.startswith("pooler.")}
    else:
        assert model.loading_info["missing_keys"] == []
        assert "classifier.weight" in model.loading_info["discarded_head_keys"]
    assert_state_equal(own, headed.bert.state_dict(), keys=sorted(own))


@pytest.mark.parametrize("head", ["BertForMaskedLM", "BertForSequenceClassification", "BertForTokenClassification"])
def test_head_loads_bare_bert_model_checkpoint(tmp_path, head):
    bare = ours_tiny_model("BertModel")
    bare.save_pretrained(tmp_path)
    assert not any(k.startswith("bert.") for k in load_file(str(tmp_path / "model.safetensors")))
    model = getattr(tl, head).from_pretrained(tmp_path)
    own = model.bert.state_dict()
    assert_state_equal(own, bare.state_dict(), keys=sorted(own))
    assert all(not k.startswith("bert.") or k.startswith("bert.pooler.") for k in model.loading_info["missing_keys"])
    assert model.loading_info["unexpected_keys"] == []


def test_old_layernorm_gamma_beta_names(tmp_path):
    model = ours_tiny_model("BertForMaskedLM")
    state = {k.replace("LayerNorm.weight", "LayerNorm.gamma").replace("LayerNorm.bias", "LayerNorm.beta"): v
             for k, v in model.state_dict().items()}
    assert any(k.endswith("LayerNorm.gamma") for k in state)
    model.config.save_pretrained(tmp_path)
    write_weights(tmp_path, state, safe=False)
    loaded = tl.BertForMaskedLM.from_pretrained(tmp_path)
    assert loaded.loading_info["missing_keys"] == [] and loaded.loading_info["unexpected_keys"] == []
    assert_state_equal(loaded.state_dict(), model.state_dict())


def test_position_ids_buffer_in_checkpoint_is_accepted(tmp_path):
    model = ours_tiny_model("BertForSequenceClassification")
    state = model.state_dict()
    state["bert.embeddings.position_ids"] = torch.arange(TINY_CONFIG["max_position_embeddings"]).unsqueeze(0)
    state["bert.embeddings.token_type_ids"] = torch.zeros(1, TINY_CONFIG["max_position_embeddings"], dtype=torch.long)
    model.config.save_pretrained(tmp_path)
    write_weights(tmp_path, state, safe=False)
    loaded = tl.BertForSequenceClassification.from_pretrained(tmp_path)
    assert loaded.loading_info["unexpected_keys"] == [] and loaded.loading_info["missing_keys"] == []
    assert_state_equal(loaded.state_dict(), model.state_dict())


def test_decoder_bias_alone_fills_prediction_bias(tmp_path):
    """Some HF 4.x checkpoints hold only ``cls.predictions.decoder.bias``."""
    model = ours_tiny_model("BertForMaskedLM")
    state = model.state_dict()
    state["cls.predictions.decoder.bias"] = state.pop("cls.predictions.bias")
    model.config.save_pretrained(tmp_path)
    write_weights(tmp_path, state, safe=False)
    loaded = tl.BertForMaskedLM.from_pretrained(tmp_path)
    assert loaded.loading_info["missing_keys"] == []
    assert torch.equal(loaded.cls.predictions.bias, model.cls.predictions.bias)


# ----------------------------------------------------------------------------- round trip and ties
@FORMATS
@pytest.mark.parametrize("head", ["BertModel", "BertForMaskedLM", "BertForSequenceClassification",
                                  "BertForTokenClassification"])
def test_save_load_round_trip_identical_state(tmp_path, head, safe):
    model = ours_tiny_model(head, num_labels=4, id2label={i: f"type {i}" for i in range(4)})
    model.save_pretrained(tmp_path, safe_serialization=safe)
    assert weights_file(tmp_path, safe).is_file() and not weights_file(tmp_path, not safe).is_file()
    assert not list(tmp_path.glob("*.tmp"))
    loaded = getattr(tl, head).from_pretrained(tmp_path)
    assert loaded.state_dict().keys() == model.state_dict().keys()
    assert_state_equal(loaded.state_dict(), model.state_dict())
    assert loaded.config.id2label == model.config.id2label
    assert loaded.config.architectures == [head]
    input_ids, mask = padded_batch(TINY_CONFIG["vocab_size"], (6, 4), seed=2)
    with torch.no_grad():
        a, b = model(input_ids, mask), loaded(input_ids, mask)
    key = "last_hidden_state" if head == "BertModel" else "logits"
    assert torch.equal(a[key], b[key])


@FORMATS
def test_saved_mlm_files_match_hf_layout(tmp_path, safe):
    model = ours_tiny_model("BertForMaskedLM")
    model.save_pretrained(tmp_path, safe_serialization=safe)
    keys = set(read_weights(tmp_path, safe))
    assert "bert.embeddings.word_embeddings.weight" in keys and "cls.predictions.bias" in keys
    if safe:  # safetensors cannot hold shared tensors; HF re-ties on load
        assert "cls.predictions.decoder.weight" not in keys
    else:  # what HF 4.x wrote
        assert {"cls.predictions.decoder.weight", "cls.predictions.decoder.bias"} <= keys
    assert not any(k.endswith("position_ids") for k in keys)


@FORMATS
def test_mlm_decoder_stays_tied_after_loading(tmp_path, safe):
    model = ours_tiny_model("BertForMaskedLM")
    model.save_pretrained(tmp_path, safe_serialization=safe)
    loaded = tl.BertForMaskedLM.from_pretrained(tmp_path)
    assert loaded.cls.predictions.decoder.weight is loaded.bert.embeddings.word_embeddings.weight
    assert torch.equal(loaded.cls.predictions.decoder.weight, model.bert.embeddings.word_embeddings.weight)
    with torch.no_grad():
        loaded.bert.embeddings.word_embeddings.weight[3] += 1.0
    assert torch.equal(loaded.cls.predictions.decoder.weight[3], loaded.bert.embeddings.word_embeddings.weight[3])
    assert "cls.predictions.decoder.weight" not in loaded.loading_info["missing_keys"]


def test_differing_decoder_copy_does_not_overwrite_word_embeddings(tmp_path, caplog):
    """A .bin whose decoder copy differs from the word embeddings: the model ties them and
    uses the word embeddings (they feed every forward pass), with a warning."""
    model = ours_tiny_model("BertForMaskedLM")
    state = {k: v.clone() for k, v in model.state_dict().items()}
    state["cls.predictions.decoder.weight"] += 1.0
    model.config.save_pretrained(tmp_path)
    write_weights(tmp_path, state, safe=False)
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        loaded = tl.BertForMaskedLM.from_pretrained(tmp_path)
    assert torch.equal(loaded.bert.embeddings.word_embeddings.weight, model.bert.embeddings.word_embeddings.weight)
    assert loaded.cls.predictions.decoder.weight is loaded.bert.embeddings.word_embeddings.weight
    assert any("cls.predictions.decoder.weight differs" in r.getMessage() for r in caplog.records)


def test_config_overrides_and_explicit_config(tmp_path):
    ours_tiny_model("BertForSequenceClassification").save_pretrained(tmp_path)
    model = tl.BertForSequenceClassification.from_pretrained(tmp_path, classifier_pooling="mean")
    assert model.config.classifier_pooling == "mean" and model.bert.pooler.mode == "mean"
    config = tiny_config(num_labels=2, prompt_type="lora")
    model = tl.BertForSequenceClassification.from_pretrained(tmp_path, config=config)
    assert model.config.uses("lora") and model.loading_info["missing_keys"]
    assert all(re.search(r"lora_[AB]$", k) for k in model.loading_info["missing_keys"])


# ----------------------------------------------------------------------------- gradient checkpointing
def count_forward_calls(module) -> list:
    """Record each run of ``module.forward``. (Forward hooks would not do: torch does not
    fire them when checkpointing recomputes the forward in backward.)"""
    calls, forward = [], module.forward

    def counting(*args, **kwargs):
        calls.append(1)
        return forward(*args, **kwargs)

    module.forward = counting
    return calls


def _loss_and_grads(model, batch, labels):
    model.zero_grad(set_to_none=True)
    loss = model(*batch, labels=labels).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_gradient_checkpointing_same_loss_and_gradients():
    model = ours_tiny_model("BertForSequenceClassification", num_labels=3).train()  # dropout 0
    batch = padded_batch(TINY_CONFIG["vocab_size"], (9, 6, 4), seed=3)
    labels = torch.tensor([0, 2, 1])
    loss, grads = _loss_and_grads(model, batch, labels)

    calls = count_forward_calls(model.bert.encoder.layer[0])
    model.gradient_checkpointing_enable()
    assert model.bert.encoder.gradient_checkpointing
    ckpt_loss, ckpt_grads = _loss_and_grads(model, batch, labels)
    assert len(calls) == 2, "with checkpointing the layer runs again in backward"
    torch.testing.assert_close(ckpt_loss, loss, atol=1e-6, rtol=0)
    assert ckpt_grads.keys() == grads.keys() and len(grads) == len(list(model.parameters()))
    for name in grads:
        torch.testing.assert_close(ckpt_grads[name], grads[name], atol=1e-6, rtol=0, msg=name)
    model.gradient_checkpointing_disable()
    assert not model.bert.encoder.gradient_checkpointing


def test_gradient_checkpointing_on_bert_model_and_off_in_eval():
    model = perturb_(tl.BertModel(tiny_config()))
    model.gradient_checkpointing_enable()
    assert model.encoder.gradient_checkpointing
    calls = count_forward_calls(model.encoder.layer[0])
    input_ids, mask = padded_batch(TINY_CONFIG["vocab_size"], (5, 3), seed=4)
    model.eval()
    model(input_ids, mask).last_hidden_state.sum().backward()
    assert len(calls) == 1, "eval mode does not recompute"
