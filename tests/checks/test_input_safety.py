"""Issue 22's bad configs and data, refused up front with exit 2 by every command through the
compatibility report (tests/checks/test_compatibility.py covers issue 21's cases)."""
from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import datasets
import pytest

from geneformer_peft.cli import main

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE_CKPT = ROOT / "Pretrain_ckpts" / "geneformer-tiny-example"
EXAMPLE_DATA = ROOT / "example_py" / "data"
EXAMPLE_TEST0 = EXAMPLE_DATA / "synthetic" / "0" / "synthetic_test0.dataset"


def _error(caplog) -> str:
    return "\n".join(r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR)


def _finetune(tmp_path, *extra):
    return main(["finetune", "--dataset_name", "synthetic", "--data_path", str(EXAMPLE_DATA), "--model_path",
                 str(EXAMPLE_CKPT), "--output_path", str(tmp_path / "out"), "--folds", "0", "--epoch", "1",
                 "--device", "cpu", "--no_progress", "--baselines", "none", *extra])


@pytest.mark.parametrize("key, value", [("lora_r", 10**8), ("num_token", 10**9)])
def test_a_config_too_large_for_memory_is_refused_with_the_estimate(key, value, tmp_path, caplog):
    config = json.loads((EXAMPLE_CKPT / "config.json").read_text())
    config.update({key: value, "prompt_type": "lora" if key == "lora_r" else "prefix_prompt"})
    (tmp_path / "method.json").write_text(json.dumps(config))
    assert _finetune(tmp_path, "--config", str(tmp_path / "method.json")) == 2
    message = _error(caplog)
    assert "memory: the model would not fit" in message and f"{key}={value}" in message and "GiB" in message
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").rglob("fold_done.json"))


def test_memory_estimate_counts_parameters_exactly():
    from geneformer_peft.checks.memory import parameter_counts
    from geneformer_peft.models.families import family_of
    from geneformer_peft.models.loading import load_classifier, resolve_config
    from transformerslocal import mark_trainable

    config = resolve_config(EXAMPLE_CKPT, prompt_type="lora", label2id={"a": 0, "b": 1})
    model = load_classifier(EXAMPLE_CKPT, config)
    mark_trainable(model)
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert parameter_counts(family_of(EXAMPLE_CKPT), config) == (total, trainable)


@pytest.mark.parametrize("value", ["2002", 2002.0, True])
def test_a_config_value_of_the_wrong_type_names_the_key(value, tmp_path, caplog):
    ckpt = tmp_path / "ckpt"
    shutil.copytree(EXAMPLE_CKPT, ckpt)
    config = json.loads((ckpt / "config.json").read_text())
    config["vocab_size"] = value
    (ckpt / "config.json").write_text(json.dumps(config))
    for argv in (["check", "--model_path", str(ckpt), "--input", str(EXAMPLE_TEST0)],
                 ["embed", "--model_path", str(ckpt), "--input", str(EXAMPLE_TEST0), "--output",
                  str(tmp_path / "e.csv"), "--device", "cpu", "--no_plots"]):
        caplog.clear()
        assert main(argv) == 2, argv[0]
        assert "vocab_size" in _error(caplog) and "an integer >= 1" in _error(caplog) and str(ckpt) in _error(caplog)


def _with_token(path: Path, token: int) -> Path:
    cells = datasets.load_from_disk(str(EXAMPLE_TEST0)).to_dict()
    cells["input_ids"][3][5] = token
    datasets.Dataset.from_dict(cells).save_to_disk(str(path))
    return path


@pytest.mark.parametrize("command", ["embed", "perturb", "pretrain", "predict"])
def test_token_ids_beyond_the_vocabulary_are_refused_by_every_command(command, tmp_path, caplog):
    data = _with_token(tmp_path / "cells.dataset", 5000)
    common = ["--model_path", str(EXAMPLE_CKPT), "--input", str(data)]
    argv = {"embed": ["embed", *common, "--output", str(tmp_path / "o.csv"), "--device", "cpu", "--no_plots"],
            "perturb": ["perturb", *common, "--output_dir", str(tmp_path / "o"), "--genes", "all", "--perturb_type", "delete", "--device", "cpu",
                        "--no_plots", "--max_ncells", "2"],
            "pretrain": ["pretrain", *common, "--output_dir", str(tmp_path / "o"), "--max_steps", "1"],
            "predict": ["predict", *common, "--output", str(tmp_path / "o.csv"), "--device", "cpu"]}[command]
    assert main(argv) == 2
    assert "holds token id 5000, but the model has vocab_size 2002" in _error(caplog)


def test_a_foreign_weight_file_is_refused_before_loading(tmp_path, caplog):
    """Weights of another model (here scBERT's) under a Geneformer config.json."""
    ckpt = tmp_path / "ckpt"
    shutil.copytree(EXAMPLE_CKPT, ckpt)
    shutil.copy(ROOT / "Pretrain_ckpts" / "scbert-tiny-example" / "model.safetensors", ckpt / "model.safetensors")
    for argv in (["embed", "--model_path", str(ckpt), "--input", str(EXAMPLE_TEST0), "--output",
                  str(tmp_path / "e.csv"), "--device", "cpu", "--no_plots"],
                 ["perturb", "--model_path", str(ckpt), "--input", str(EXAMPLE_TEST0), "--output_dir",
                  str(tmp_path / "p"), "--genes", "all", "--perturb_type", "delete", "--device", "cpu", "--no_plots"]):
        caplog.clear()
        assert main(argv) == 2, argv[0]
        assert "holds none of the tensors" in _error(caplog) and str(ckpt / "model.safetensors") in _error(caplog)


def test_labels_of_different_types_across_splits_are_refused(job_data, tmp_path, caplog):
    import job_factories as jf

    data = jf.copy_job_data(job_data, tmp_path)
    ids = {name: i for i, name in enumerate(job_data.labels)}
    jf.rewrite_split(data, 1, "test", lambda cols: cols.update(cell_type=[ids[v] for v in cols["cell_type"]]))
    assert jf.run_finetune(data.finetune_argv(tmp_path / "out", "--prompt_type", "lora")) == 2
    message = _error(caplog)
    assert "fold 1" in message and "holds values of different types across the splits" in message
    assert "'int'" in message and "'str'" in message
    assert not (jf.run_dir(tmp_path / "out", "lora", data) / "0").exists()


def test_a_missing_label_is_named_as_missing_not_as_another_type(job_data, tmp_path, caplog):
    """One None among the string labels of a single-task run: refused as a missing label, without
    a second problem calling None a value of another type."""
    import job_factories as jf

    data = jf.copy_job_data(job_data, tmp_path)
    jf.rewrite_split(data, 0, "train", lambda cols: cols["cell_type"].__setitem__(3, None))
    assert jf.run_finetune(data.finetune_argv(tmp_path / "out", "--prompt_type", "lora", "--folds", "0")) == 2
    message = _error(caplog)
    assert "holds missing values (None)" in message and "different types" not in message


def test_a_config_with_a_huge_hidden_size_is_refused_with_the_estimate(tmp_path, caplog):
    """A checkpoint's own config.json asking for hidden_size 10**6: refused before allocating."""
    ckpt = tmp_path / "ckpt"
    shutil.copytree(EXAMPLE_CKPT, ckpt)
    config = json.loads((ckpt / "config.json").read_text())
    config.update(hidden_size=10**6, intermediate_size=4 * 10**6)
    (ckpt / "config.json").write_text(json.dumps(config))
    assert _finetune(tmp_path, "--model_path", str(ckpt), "--prompt_type", "lora") == 2
    assert "hidden_size" in _error(caplog) and "GiB" in _error(caplog)


@pytest.mark.parametrize("spoil", ["truncated", "not a weight file"])
@pytest.mark.parametrize("command", ["embed", "perturb"])
def test_a_truncated_or_foreign_weight_file_is_named_by_embed_and_perturb(command, spoil, tmp_path, caplog):
    ckpt = tmp_path / "ckpt"
    shutil.copytree(EXAMPLE_CKPT, ckpt)
    weights = ckpt / "model.safetensors"
    if spoil == "truncated":
        weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    else:
        weights.write_bytes(bytes(range(256)) * 64)
    argv = {"embed": ["embed", "--output", str(tmp_path / "e.csv"), "--no_plots"],
            "perturb": ["perturb", "--output_dir", str(tmp_path / "p"), "--genes", "all", "--perturb_type", "delete",
                        "--no_plots", "--max_ncells", "2"]}[command]
    assert main([*argv, "--model_path", str(ckpt), "--input", str(EXAMPLE_TEST0), "--device", "cpu"]) == 2
    assert str(weights) in _error(caplog) and "truncated or not a checkpoint" in _error(caplog)


def test_labels_coded_as_numbers_with_a_nan_are_named_as_missing(job_data, tmp_path, caplog):
    """The issue's "labels ['nan'] not in label set [..., 'nan']": float class codes with a NaN."""
    import job_factories as jf

    data = jf.copy_job_data(job_data, tmp_path)
    codes = {name: float(i) for i, name in enumerate(job_data.labels)}
    for split in ("train", "val", "test"):
        def coded(cols, split=split):
            cols["cell_type"] = [codes[v] for v in cols["cell_type"]]
            if split != "val":
                cols["cell_type"][0] = float("nan")

        jf.rewrite_split(data, 0, split, coded)
    assert jf.run_finetune(data.finetune_argv(tmp_path / "out", "--prompt_type", "lora", "--folds", "0")) == 2
    message = _error(caplog)
    assert "missing labels" in message and "train split" in message and "not in the model's label set" not in message
    assert not (jf.run_dir(tmp_path / "out", "lora", data) / "0").exists()
