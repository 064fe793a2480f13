"""CellFM as a model family: found by its config and model_type, run by the job."""
from __future__ import annotations

import pytest

import transformerslocal as tl
from geneformer_peft.models.families import FAMILIES, family_of, family_of_config

SIZES = dict(vocab_size=40, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=24,
             value_slots=16, max_genes=16)


def test_the_family_of_a_cellfm_config():
    family = family_of_config(tl.CellFMConfig(**SIZES))
    assert FAMILIES["cellfm"] is family
    assert family.classifier_class is tl.CellFMForSequenceClassification
    assert family.masked_lm_class is tl.CellFMForMaskedValues
    model = family.classifier_class(tl.CellFMConfig(**SIZES, num_labels=4))
    assert tuple(model.state_dict()[family.head_out_weight].shape) == (4, 32)
    assert family.input_length(tl.CellFMConfig(**SIZES)) == 17  # max_genes + the cls token
    assert {"prompt_type", "lora_target_modules", "ia3_target_modules"} <= set(family.peft_keys)


def test_the_job_takes_a_cellfm_checkpoint(tmp_path):
    """Every command of the job runs CellFM (tests/training/test_cellfm_job.py): its checkpoint is
    no longer refused, and its cls is the one position of its input no dataset token fills."""
    tl.CellFMModel(tl.CellFMConfig(**SIZES)).save_pretrained(tmp_path / "cellfm")
    family = family_of(tmp_path / "cellfm")
    assert family is FAMILIES["cellfm"] and family.values_column == "values"
    assert family.data_length(family.input_length(tl.CellFMConfig(**SIZES))) == SIZES["max_genes"]
    assert FAMILIES["bert"].data_length(64) == 64 and FAMILIES["bert"].values_column is None
