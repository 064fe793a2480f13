"""Bad inputs to the fine-tuning job: each a non-zero exit with a message naming the
file, field or value at fault."""
from __future__ import annotations

import logging
import shutil

import pytest
import torch

import job_factories as jf


def _fail(example_script, argv, caplog) -> str:
    """Run the example script's main in this process; assert it fails; return its log."""
    caplog.clear()
    with caplog.at_level(logging.ERROR):
        status = example_script.main(argv)
    assert status != 0
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert errors, "a failing run must log an error"
    return "\n".join(errors)


def test_missing_label_column_exits_nonzero_in_a_subprocess(job_data, tmp_path):
    proc = jf.run_script(job_data.finetune_argv(tmp_path, "--prompt_type", "lora", "--label_column", "nope"))
    assert proc.returncode != 0
    assert "'nope'" in proc.stderr and "cell_type" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_missing_fold_folder_lists_paths(job_data, tmp_path, example_script, caplog):
    message = _fail(example_script, job_data.finetune_argv(tmp_path, "--prompt_type", "lora", "--folds", "0,7"),
                    caplog)
    for split in ("train", "val", "test"):
        assert str(job_data.data_path / job_data.dataset_name / "7" / f"tiny_{split}7.dataset") in message
    assert not (jf.run_dir(tmp_path, "lora", job_data) / "0").exists(), "no fold may train before the check"


def test_unknown_dataset_names_where_it_looked(job_data, tmp_path, example_script, caplog):
    argv = job_data.finetune_argv(tmp_path, "--prompt_type", "lora")
    argv[argv.index("--dataset_name") + 1] = "nosuch"
    message = _fail(example_script, argv, caplog)
    assert str(job_data.data_path / "nosuch") in message


def test_checkpoint_without_weights(job_data, tmp_path, example_script, caplog):
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    shutil.copy(job_data.model_path / "config.json", ckpt / "config.json")
    argv = job_data.finetune_argv(tmp_path / "out", "--prompt_type", "lora")
    argv[argv.index("--model_path") + 1] = str(ckpt)
    message = _fail(example_script, argv, caplog)
    assert str(ckpt) in message and "pytorch_model.bin" in message and "model.safetensors" in message


def test_label_set_larger_than_checkpoint_head(job_data, tmp_path, example_script, caplog):
    from transformerslocal import BertConfig, BertForSequenceClassification

    config = BertConfig.from_pretrained(job_data.model_path)
    config = config.copy(id2label={0: "B cell", 1: "T cell"}, label2id={"B cell": 0, "T cell": 1})
    torch.manual_seed(0)
    BertForSequenceClassification(config).save_pretrained(tmp_path / "two_labels")
    argv = job_data.finetune_argv(tmp_path / "out", "--prompt_type", "lora", "--folds", "0")
    argv[argv.index("--model_path") + 1] = str(tmp_path / "two_labels")
    message = _fail(example_script, argv, caplog)
    assert "2 labels" in message and "3" in message and "Macrophage" in message


def test_cuda_on_a_cpu_machine(job_data, tmp_path, example_script, caplog):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    argv = job_data.finetune_argv(tmp_path, "--prompt_type", "lora")
    argv[argv.index("--device") + 1] = "cuda"
    message = _fail(example_script, argv, caplog)
    assert "'cuda'" in message and "--device cpu" in message


def test_nan_loss_stops_the_fold_and_keeps_finished_folds(job_data, tmp_path, example_script, caplog):
    argv = job_data.finetune_argv(tmp_path, "--prompt_type", "lora")
    assert example_script.main([*argv, "--folds", "0"]) == 0
    run = jf.run_dir(tmp_path, "lora", job_data)
    before = {p.name: p.stat().st_mtime_ns for p in (run / "0").iterdir()}
    # the last --lr wins; fold 1 alone, since a rerun with another lr over finished fold 0 is refused
    diverging = [*argv, "--lr", "1e30", "--folds", "1"]
    caplog.clear()
    with caplog.at_level(logging.ERROR):
        assert example_script.main(diverging) == 3
    message = "\n".join(r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR)
    assert "fold 1" in message and "step" in message and "nan" in message.lower()
    assert {p.name: p.stat().st_mtime_ns for p in (run / "0").iterdir()} == before
    assert not (run / "1").exists()


def test_cli_reports_bad_input_without_traceback(job_data, tmp_path, caplog):
    """``geneformer-peft finetune`` fails as cleanly as the example script."""
    argv = job_data.finetune_argv(tmp_path, "--prompt_type", "lora")
    argv[argv.index("--device") + 1] = "cuda:7"
    if torch.cuda.device_count() > 7:
        pytest.skip("this machine has 8 GPUs")
    with caplog.at_level(logging.ERROR):
        assert jf.run_finetune(argv) != 0
    assert "cuda:7" in caplog.text


@pytest.mark.parametrize("case", ["pretrained_checkpoint", "missing_folder"])
def test_predict_refuses_a_model_without_a_trained_head(case, job_data, tmp_path, caplog):
    """A pretrained checkpoint has a random classifier: predicting with it is an error, not noise."""
    from geneformer_peft.cli import main

    model_path = job_data.model_path if case == "pretrained_checkpoint" else tmp_path / "nosuch"
    caplog.clear()
    with caplog.at_level(logging.ERROR):
        status = main(["predict", "--model_path", str(model_path), "--input", str(job_data.fold_file(0, "test")),
                       "--output", str(tmp_path / "x.csv"), "--device", "cpu"])
    assert status == 2
    assert str(model_path) in caplog.text
    assert not (tmp_path / "x.csv").exists()
