"""--config applies a method config.json's PEFT keys to the checkpoint; shapes must agree."""
from __future__ import annotations

import json

import pytest

import job_factories as jf
from geneformer_peft.models.loading import resolve_config
from transformerslocal import BertConfig

REPO = jf.ROOT


def test_method_config_keys_apply_and_reach_the_fold(job_data, tmp_path):
    method = BertConfig.from_pretrained(job_data.model_path).copy(
        prompt_type="encoder_prompt", adapter_ratio=0.5, space_adapter_conf=[0, 1], mlp_adapter_conf=[1, 0])
    method.save_pretrained(tmp_path / "method")
    out = tmp_path / "out"
    assert jf.run_finetune(job_data.finetune_argv(out, "--config", str(tmp_path / "method" / "config.json"),
                                                  "--folds", "0", "--epoch", "1")) == 0
    saved = json.loads((jf.run_dir(out, "encoder_prompt", job_data) / "0" / "config.json").read_text())
    assert saved["prompt_type"] == "encoder_prompt" and saved["adapter_ratio"] == 0.5
    assert saved["space_adapter_conf"] == [0, 1] and saved["mlp_adapter_conf"] == [1, 0]
    assert sorted(saved["label2id"]) == sorted(job_data.labels)


def test_prompt_type_and_use_prompt_override_the_config(job_data):
    on = resolve_config(job_data.model_path, prompt_type="Gene_token_prompt,lora")
    assert on.peft_methods == ("Gene_token_prompt", "lora")
    off = resolve_config(job_data.model_path, prompt_type="Gene_token_prompt,lora", use_prompt=False)
    assert off.prompt_type == "Gene_token_prompt,lora" and off.peft_methods == ()


def test_config_of_another_model_size_is_refused(job_data):
    twelve = REPO / "Pretrain_ckpts" / "geneformer-12L-30M-lora" / "config.json"
    with pytest.raises(ValueError, match=r"hidden_size=512 \(checkpoint has 32\).*num_hidden_layers=12"):
        resolve_config(job_data.model_path, config_path=twelve)


def test_fine_tuned_head_of_other_label_names_is_refused(job_data, tmp_path):
    """Same number of classes, other names: the head's rows would mean other cell types."""
    from geneformer_peft.models.loading import load_classifier
    from transformerslocal import BertForSequenceClassification

    names = {i: f"other type {i}" for i in range(len(job_data.labels))}
    fine_tuned = BertForSequenceClassification.from_pretrained(
        job_data.model_path, id2label=names, label2id={v: k for k, v in names.items()})
    fine_tuned.save_pretrained(tmp_path / "fine_tuned")
    ours = {label: i for i, label in enumerate(job_data.labels)}
    config = resolve_config(tmp_path / "fine_tuned", label2id=ours)
    with pytest.raises(ValueError, match="classifier trained on labels .*other type 0.* data's labels"):
        load_classifier(tmp_path / "fine_tuned", config)
    # the same names in the same order load
    same = resolve_config(tmp_path / "fine_tuned", label2id={v: k for k, v in names.items()})
    assert load_classifier(tmp_path / "fine_tuned", same).config.id2label == names
