"""The cross-validation job run unchanged on a tiny scBERT checkpoint (the model family comes from
its config.json): every output file, resume of an interrupted fold, prediction from the fold
folders (full and PEFT-only weights) and ``--unassign_threshold`` writing ``Unassigned``."""
from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

import job_factories as jf
import transformerslocal as tl
from geneformer_peft.cli import main
from geneformer_peft.training import trainer as trainer_module

N_GENES = 200
FLAGS = ["--batch_size", "8", "--no_progress", "--lr", "3e-3", "--device", "cpu", "--prompt_type", "lora"]
FOLD_FILES = {"config.json", "metrics.json", "predictions.csv", "predictions.pickle", "history.json",
              "fold_done.json", "peft_model.safetensors", "provenance.json", "confusion_matrix.png",
              "training_curves.png", "baseline_metrics.json", "baseline_predictions.csv"}


class Interrupted(Exception):
    """Stands for a killed process (raised right after an epoch checkpoint was written)."""


@pytest.fixture(scope="module")
def scbert_job(tmp_path_factory):
    """Synthetic cells, binned on their own 200-gene panel and split in 2 folds, and a tiny random
    scBERT ``PerformerForMaskedLM`` (2 layers, dim 32, 201 positions)."""
    from geneformer_peft.data.binned import tokenize_binned
    from geneformer_peft.data.folds import split_folds
    from geneformer_peft.data.synthetic import generate_counts

    root = tmp_path_factory.mktemp("scbert_job")
    adata = generate_counts(n_cells=60, n_genes=N_GENES, n_cell_types=3, seed=0, class_proportions=[0.4, 0.35, 0.25])
    cells = tokenize_binned(adata, gene_panel=list(adata.var_names), label_column="cell_type", min_genes=1,
                            show_progress=False)
    cells.save_to_disk(str(root / "cells.dataset"))
    split_folds(cells, dataset_name="tiny", output_dir=root / "folds", n_folds=2, label_column="cell_type", seed=0,
                val_fraction=0.2)
    torch.manual_seed(0)
    config = tl.PerformerConfig(num_tokens=7, max_seq_len=N_GENES + 1, dim=32, depth=2, heads=4, dim_head=8,
                                feature_redraw_interval=None, classifier_hidden_sizes=[16, 8])
    tl.PerformerForMaskedLM(config, warn_random_positions=False).save_pretrained(root / "ckpt")
    config.save_pretrained(root / "scratch")
    return root


def _argv(root: Path, output: Path, *extra: str) -> list[str]:
    return ["finetune", "--dataset_name", "tiny", "--data_path", str(root / "folds"), "--model_path",
            str(root / "ckpt"), "--output_path", str(output), *FLAGS, *extra]


def _metrics(run: Path, fold: int) -> dict:
    return jf.result_metrics(jf.read_json(run / str(fold) / "metrics.json"))


def test_scbert_job_outputs_resume_and_predict(scbert_job, tmp_path, monkeypatch, caplog):
    root = scbert_job
    argv = ["--epoch", "3", "--early_stopping_patience", "0"]
    reference = tmp_path / "reference" / "lora" / "tiny"
    assert main(_argv(root, tmp_path / "reference", *argv, "--folds", "1")) == 0

    original = trainer_module.FoldTrainer._save_checkpoint

    def save_then_die(self, epoch, state):
        original(self, epoch, state)
        if self.desc == "fold 1" and epoch == 2:
            raise Interrupted("killed after epoch 2")

    monkeypatch.setattr(trainer_module.FoldTrainer, "_save_checkpoint", save_then_die)
    run = tmp_path / "out" / "lora" / "tiny"
    with pytest.raises(Interrupted):
        main(_argv(root, tmp_path / "out", *argv))
    monkeypatch.undo()
    assert (run / "0" / "fold_done.json").is_file() and not (run / "1").exists()
    with caplog.at_level(logging.INFO):
        assert main(_argv(root, tmp_path / "out", *argv)) == 0
    assert "fold 0: finished earlier, skipped" in caplog.text and "resuming after epoch 2" in caplog.text
    # the linear baseline reads the binned expression per panel gene, not a bag of bin values
    assert "tokens features, binned encoding" in caplog.text
    assert _metrics(run, 1) == _metrics(reference, 1)

    assert {"summary.csv", "summary.json", "run.log"} <= {p.name for p in run.iterdir()}
    for fold in (0, 1):
        files = {p.name for p in (run / str(fold)).iterdir()}
        assert FOLD_FILES <= files, f"fold {fold} lacks {sorted(FOLD_FILES - files)}"
        config = json.loads((run / str(fold) / "config.json").read_text())
        assert config["model_type"] == "scbert" and config["prompt_type"] == "lora"
        metrics = jf.read_json(run / str(fold) / "metrics.json")
        assert metrics["prompt_type"] == "lora" and 0 < metrics["trainable_parameters"] < metrics["total_parameters"]
        frame = pd.read_csv(run / str(fold) / "predictions.csv")
        assert len(frame) == len(set(frame["index"])) > 0

    # prediction from the fold folder: full weights, and PEFT-only weights on the base
    fold_dir, test = run / "0", root / "folds" / "tiny" / "0" / "tiny_test0.dataset"
    expected = pd.read_csv(fold_dir / "predictions.csv")
    prob_columns = [c for c in expected.columns if c.startswith("prob_")]
    for extra in ([], ["--base_model", str(root / "ckpt")]):
        out = tmp_path / f"pred{len(extra)}.csv"
        assert main(["predict", "--model_path", str(fold_dir), "--input", str(test), "--output", str(out),
                     *extra]) == 0
        got = pd.read_csv(out)
        np.testing.assert_allclose(got[prob_columns].to_numpy(), expected[prob_columns].to_numpy(), atol=1e-5)
    out = tmp_path / "unassigned.csv"
    assert main(["predict", "--model_path", str(fold_dir), "--input", str(test), "--output", str(out),
                 "--unassign_threshold", "1.0"]) == 0
    got = pd.read_csv(out)
    assert (got["pred_celltype"] == "Unassigned").all() and (got["pred_cellcode"] == -1).all()


def test_scbert_random_init_and_full_finetune(scbert_job, tmp_path):
    output = tmp_path / "out"
    assert main(_argv(scbert_job, output, "--epoch", "1", "--folds", "0", "--prompt_type", "", "--random_init")) == 0
    run = next(p for p in output.iterdir() if p.is_dir()) / "tiny"
    metrics = jf.read_json(run / "0" / "metrics.json")
    assert metrics["trainable_parameters"] == metrics["total_parameters"]
    assert json.loads((run / "0" / "config.json").read_text())["model_type"] == "scbert"


def test_scbert_pretrain_from_config_and_from_checkpoint(scbert_job, tmp_path, caplog):
    root = scbert_job
    with caplog.at_level(logging.INFO):
        assert main(["pretrain", "--input", str(root / "cells.dataset"), "--output_dir", str(tmp_path / "scratch"),
                     "--config", str(root / "scratch" / "config.json"), "--epochs", "2", "--batch_size", "8",
                     "--device", "cpu"]) == 0
    assert "MLM loss of predicting every masked gene by its frequency alone" in caplog.text
    model = tl.PerformerForMaskedLM.from_pretrained(tmp_path / "scratch")
    assert model.loading_info["missing_keys"] == []
    start = tl.PerformerForMaskedLM.from_pretrained(root / "ckpt")
    assert main(["pretrain", "--input", str(root / "cells.dataset"), "--output_dir", str(tmp_path / "more"),
                 "--model_path", str(root / "ckpt"), "--max_steps", "3", "--batch_size", "8", "--device", "cpu"]) == 0
    more = tl.PerformerForMaskedLM.from_pretrained(tmp_path / "more")
    assert not torch.equal(more.token_emb.weight, start.token_emb.weight)
    assert torch.equal(more.pos_emb.emb.weight, start.pos_emb.emb.weight), "the gene embedding stays frozen"
    # the pretrained checkpoint is what the job fine-tunes
    assert main(_argv(root, tmp_path / "ft", "--epoch", "1", "--folds", "0", "--model_path",
                      str(tmp_path / "more"))) == 0


def test_scbert_pretrain_masks_like_scbert(scbert_job):
    """The loop's loss is the cross-entropy on positions the binned collator chose (non-zero only)."""
    from datasets import load_from_disk

    from geneformer_peft.data.binned_collator import BinnedMaskingCollator
    from geneformer_peft.data.cells import EncodedCells
    from geneformer_peft.training.pretrain import frequency_baseline_loss

    cells = EncodedCells.from_dataset(load_from_disk(str(scbert_job / "cells.dataset")))
    batch = BinnedMaskingCollator(bin_num=5, seed=0)([cells[i] for i in range(8)])
    chosen = batch["labels"] != 6
    assert chosen.any() and bool((batch["labels"][chosen] > 0).all())
    tokens = cells.flat[cells.flat > 0]
    p = np.bincount(tokens, minlength=7)[1:] / tokens.size
    p = p[p > 0]
    assert frequency_baseline_loss(cells, 7, min_token=1) == pytest.approx(float(-(p * np.log(p)).sum()))


def test_scbert_job_refuses_cells_of_another_panel(scbert_job, tmp_path, caplog):
    import shutil

    from datasets import Dataset, load_from_disk

    folds = tmp_path / "folds"
    shutil.copytree(scbert_job / "folds", folds)
    test = folds / "tiny" / "0" / "tiny_test0.dataset"
    original = load_from_disk(str(test))
    short = Dataset.from_dict({**original.to_dict(), "input_ids": [ids[:-5] for ids in original["input_ids"]]})
    del original
    shutil.rmtree(test)
    short.save_to_disk(str(test))
    argv = _argv(scbert_job, tmp_path / "out", "--epoch", "1", "--folds", "0")
    argv[argv.index("--data_path") + 1] = str(folds)
    with caplog.at_level(logging.ERROR):
        assert main(argv) == 2
    assert f"have another number of tokens than the model's {N_GENES + 1}" in caplog.text
