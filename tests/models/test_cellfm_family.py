"""CellFM as a model family: found by its config and model_type, and refused clearly by the
commands that do not run it yet."""
from __future__ import annotations

import pytest

import transformerslocal as tl
from geneformer_peft.cli import main
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


def test_commands_not_written_for_cellfm_refuse_it_saying_why(tmp_path):
    tl.CellFMModel(tl.CellFMConfig(**SIZES)).save_pretrained(tmp_path / "cellfm")
    assert family_of(tmp_path / "cellfm") is FAMILIES["cellfm"]
    assert family_of(tmp_path / "cellfm", "finetune") is FAMILIES["cellfm"]  # the job runs it (test_cellfm_job.py)
    for command in dict(FAMILIES["cellfm"].not_in_job):
        with pytest.raises(ValueError, match=f"model_type 'cellfm', which {command} does not run yet"):
            family_of(tmp_path / "cellfm", command)
    assert FAMILIES["bert"].not_in_job == () and FAMILIES["scbert"].not_in_job == ()


def test_perturb_exits_2_on_cellfm(job_data, tmp_path, caplog):
    folder = tmp_path / "cellfm"
    tl.CellFMModel(tl.CellFMConfig(**SIZES)).save_pretrained(folder)
    argv = ["perturb", "--model_path", str(folder), "--input", str(job_data.cells), "--output_dir",
            str(tmp_path / "out"), "--perturb_type", "delete", "--genes", "all"]
    assert main(argv) == 2
    assert "which perturb does not run yet" in caplog.text
    assert not (tmp_path / "out").exists()
