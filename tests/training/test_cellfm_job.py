"""The cross-validation job run unchanged on a tiny CellFM checkpoint (the family comes from its
config.json): every output file, resume of an interrupted fold, the values baseline, prediction
from the fold folders (full and PEFT-only weights) equal to the model run directly on the
dataset's ids *and values*, ``--max_length`` counting the cls, and the encodings refused across
families."""
from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from cellfm_factories import JOB_MAX_GENES, make_cellfm_job_data

import job_factories as jf
from geneformer_peft.cli import main
from geneformer_peft.data.dataset_io import load_saved_dataset
from geneformer_peft.training import trainer as trainer_module

FLAGS = ["--batch_size", "8", "--no_progress", "--lr", "3e-3", "--device", "cpu"]
FOLD_FILES = {"config.json", "metrics.json", "predictions.csv", "predictions.pickle", "history.json",
              "fold_done.json", "peft_model.safetensors", "provenance.json", "confusion_matrix.png",
              "training_curves.png", "baseline_metrics.json", "baseline_predictions.csv", "tokenizer.json"}


class Interrupted(Exception):
    """Stands for a killed process (raised right after an epoch checkpoint was written)."""


@pytest.fixture(scope="module")
def cellfm_job(tmp_path_factory):
    return make_cellfm_job_data(tmp_path_factory.mktemp("cellfm_job"))


def _argv(data, output: Path, *extra: str) -> list[str]:
    return ["finetune", "--dataset_name", data.dataset_name, "--data_path", str(data.data_path), "--model_path",
            str(data.model_path), "--output_path", str(output), *FLAGS, *extra]


def _direct_probabilities(fold_dir: Path, test: Path, *, max_genes: int | None = None, zero_values: bool = False):
    """The fold's classifier run by hand on the test split's ids and values (one cell at a time)."""
    import transformerslocal as tl

    model = tl.CellFMForSequenceClassification.from_pretrained(fold_dir).eval()
    dataset = load_saved_dataset(test)
    out = []
    with torch.no_grad():
        for ids, values in zip(dataset["input_ids"], dataset["values"]):
            ids, values = torch.tensor([ids[:max_genes]]), torch.tensor([values[:max_genes]])
            if zero_values:
                values = torch.zeros_like(values)
            out.append(torch.softmax(model(ids, values).logits, dim=-1)[0].numpy())
    return np.stack(out)


def test_cellfm_job_outputs_resume_and_predict(cellfm_job, tmp_path, monkeypatch, caplog):
    data = cellfm_job
    argv = ["--epoch", "3", "--early_stopping_patience", "0", "--prompt_type", "lora"]
    reference = tmp_path / "reference" / "lora" / "tiny"
    assert main(_argv(data, tmp_path / "reference", *argv, "--folds", "1")) == 0

    original = trainer_module.FoldTrainer._save_checkpoint

    def save_then_die(self, epoch, state):
        original(self, epoch, state)
        if self.desc == "fold 1" and epoch == 2:
            raise Interrupted("killed after epoch 2")

    monkeypatch.setattr(trainer_module.FoldTrainer, "_save_checkpoint", save_then_die)
    run = tmp_path / "out" / "lora" / "tiny"
    with pytest.raises(Interrupted):
        main(_argv(data, tmp_path / "out", *argv))
    monkeypatch.undo()
    assert (run / "0" / "fold_done.json").is_file() and not (run / "1").exists()
    with caplog.at_level(logging.INFO):
        assert main(_argv(data, tmp_path / "out", *argv)) == 0
    assert "fold 0: finished earlier, skipped" in caplog.text and "resuming after epoch 2" in caplog.text
    # the linear baseline reads each gene's log1p value at its id
    assert "tokens features, values encoding" in caplog.text
    assert jf.result_metrics(jf.read_json(run / "1" / "metrics.json")) == \
        jf.result_metrics(jf.read_json(reference / "1" / "metrics.json"))
    compatibility = jf.read_json(run / "compatibility.json")
    assert "cellfm, as the model reads" in json.dumps(compatibility)

    assert {"summary.csv", "summary.json", "run.log"} <= {p.name for p in run.iterdir()}
    for fold in (0, 1):
        files = {p.name for p in (run / str(fold)).iterdir()}
        assert FOLD_FILES <= files, f"fold {fold} lacks {sorted(FOLD_FILES - files)}"
        config = jf.read_json(run / str(fold) / "config.json")
        assert config["model_type"] == "cellfm" and config["prompt_type"] == "lora"
        assert config["finetune_max_length"] == JOB_MAX_GENES + 1  # the cls and max_genes genes
        metrics = jf.read_json(run / str(fold) / "metrics.json")
        assert 0 < metrics["trainable_parameters"] < metrics["total_parameters"]
        assert jf.read_json(run / str(fold) / "provenance.json")

    # the fold's predictions are the model's on the ids and their values (zeroed values differ)
    fold_dir, test = run / "0", data.fold_file(0, "test")
    expected = pd.read_csv(fold_dir / "predictions.csv")
    prob_columns = [c for c in expected.columns if c.startswith("prob_")]
    direct = _direct_probabilities(fold_dir, test)
    np.testing.assert_allclose(expected[prob_columns].to_numpy(), direct, atol=1e-5)
    assert np.abs(_direct_probabilities(fold_dir, test, zero_values=True) - direct).max() > 1e-3
    for extra in ([], ["--base_model", str(data.model_path)]):
        out = tmp_path / f"pred{len(extra)}.csv"
        assert main(["predict", "--model_path", str(fold_dir), "--input", str(test), "--output", str(out),
                     *extra]) == 0
        np.testing.assert_allclose(pd.read_csv(out)[prob_columns].to_numpy(), direct, atol=1e-5)
    # --max_length counts positions with the cls: 11 reads each cell's first 10 genes (the highest values)
    out = tmp_path / "short.csv"
    assert main(["predict", "--model_path", str(fold_dir), "--input", str(test), "--output", str(out),
                 "--max_length", "11"]) == 0
    np.testing.assert_allclose(pd.read_csv(out)[prob_columns].to_numpy(),
                               _direct_probabilities(fold_dir, test, max_genes=10), atol=1e-5)


def test_cellfm_full_finetune_random_init_and_mlp_head(cellfm_job, tmp_path):
    output = tmp_path / "out"
    assert main(_argv(cellfm_job, output, "--epoch", "1", "--folds", "0", "--prompt_type", "", "--random_init")) == 0
    run = output / "full_finetune" / "tiny"
    metrics = jf.read_json(run / "0" / "metrics.json")
    assert metrics["trainable_parameters"] == metrics["total_parameters"]
    # the recipe's MLP head chosen by a --config of the checkpoint's size
    method = {**jf.read_json(cellfm_job.model_path / "config.json"), "classifier_head": "mlp"}
    (tmp_path / "method.json").write_text(json.dumps(method))
    assert main(_argv(cellfm_job, tmp_path / "mlp", "--epoch", "1", "--folds", "0", "--prompt_type", "",
                      "--max_length", "20", "--config", str(tmp_path / "method.json"))) == 0
    config = jf.read_json(tmp_path / "mlp" / "full_finetune" / "tiny" / "0" / "config.json")
    assert config["finetune_max_length"] == 20 and config["classifier_head"] == "mlp"


def test_encodings_are_refused_across_families(cellfm_job, job_data, tmp_path, caplog):
    """Rank-value folds on a CellFM checkpoint, and CellFM folds on a BERT checkpoint: exit 2
    before training, naming both encodings."""
    argv = _argv(cellfm_job, tmp_path / "a", "--epoch", "1", "--folds", "0")
    argv[argv.index("--data_path") + 1] = str(job_data.data_path)
    with caplog.at_level(logging.ERROR):
        assert main(argv) == 2
    assert "is rank_value-encoded" in caplog.text and "reads cellfm-encoded cells" in caplog.text
    argv = _argv(cellfm_job, tmp_path / "b", "--epoch", "1", "--folds", "0")
    argv[argv.index("--model_path") + 1] = str(job_data.model_path)
    caplog.clear()
    with caplog.at_level(logging.ERROR):
        assert main(argv) == 2
    assert "is cellfm-encoded" in caplog.text and "reads rank_value-encoded cells" in caplog.text
    assert not (tmp_path / "a").exists() or not any((tmp_path / "a").rglob("fold_done.json"))


def test_cells_without_values_are_refused_naming_the_column(cellfm_job, tmp_path):
    from datasets import load_from_disk

    from geneformer_peft.data.cells import EncodedCells
    from geneformer_peft.errors import DataError

    cells = load_from_disk(str(cellfm_job.cells))
    with pytest.raises(DataError, match="no 'values' column; the model reads each gene's expression value"):
        EncodedCells.from_dataset(cells.remove_columns("values"), values_column="values")
    shifted = cells.map(lambda row: {"values": row["values"][1:]})
    with pytest.raises(DataError, match="row 0 has .* 'values' for .* input_ids; expected one value per gene"):
        EncodedCells.from_dataset(shifted, values_column="values")
    encoded = EncodedCells.from_dataset(cells, values_column="values", max_length=5)
    item = encoded[0]
    np.testing.assert_allclose(item["values"], cells[0]["values"][:5], rtol=1e-6)
    assert "values" not in EncodedCells.from_dataset(cells)[0]


def test_cellfm_embed_cls_and_cell_modes(cellfm_job, tmp_path, caplog):
    """``embed`` on a CellFM checkpoint: ``cls`` is the model's own cls state at the read layer,
    ``cell`` the mean over the gene positions; both from the ids and their values."""
    import anndata

    import transformerslocal as tl

    data = cellfm_job
    model = tl.CellFMForMaskedValues.from_pretrained(data.model_path).eval()
    dataset = load_saved_dataset(data.cells)
    for mode, layer in (("cls", "0"), ("cell", "-1")):
        out = tmp_path / f"{mode}.h5ad"
        assert main(["embed", "--model_path", str(data.model_path), "--input", str(data.cells), "--output", str(out),
                     "--emb_mode", mode, "--emb_layer", layer, "--no_plots", "--device", "cpu",
                     "--batch_size", "7"]) == 0
        got = anndata.read_h5ad(out).obsm["X_geneformer"]
        with torch.no_grad():
            for row in (0, 5, len(dataset) - 1):
                ids, values = torch.tensor([dataset[row]["input_ids"]]), torch.tensor([dataset[row]["values"]])
                hidden = model(ids, values, output_hidden_states=True).hidden_states[2 + int(layer)][0]
                want = hidden[0] if mode == "cls" else hidden[1:].mean(dim=0)
                np.testing.assert_allclose(got[row], want.numpy(), atol=1e-5)
    assert "cell_type" in jf.read_json(tmp_path / "embedding_metrics.json")["labels"]
    assert main(["embed", "--model_path", str(data.model_path), "--input", str(data.cells), "--output",
                 str(tmp_path / "gene.h5ad"), "--emb_mode", "gene", "--no_plots"]) == 2
    assert "--emb_mode gene is not written for a cellfm model" in caplog.text
    assert main(["embed", "--model_path", str(data.model_path), "--input", str(data.cells), "--output",
                 str(tmp_path / "random.h5ad"), "--emb_mode", "cls", "--no_plots", "--random_init"]) == 0


def test_cellfm_recipe_reinitialised_frozen_gene_embedding(cellfm_job, tmp_path):
    """The recipe end to end: the gene embedding re-initialised for the data's vocabulary
    (remap-vocab --reinit_all_rows), frozen by freeze_preset "cellfm" with the MLP head; the fold
    keeps that embedding exactly and trains the encoder."""
    import transformerslocal as tl

    data = cellfm_job
    recipe = tmp_path / "recipe_ckpt"
    vocabulary = tmp_path / "lab.json"
    vocabulary.write_text(json.dumps(data.token_dictionary))
    assert main(["remap-vocab", "--model_path", str(data.model_path), "--token_dictionary", str(vocabulary),
                 "--output_dir", str(recipe), "--reinit_all_rows"]) == 0
    method = {**jf.read_json(recipe / "config.json"), "classifier_head": "mlp", "freeze_preset": "cellfm"}
    (tmp_path / "method.json").write_text(json.dumps(method))
    argv = _argv(data, tmp_path / "out", "--epoch", "2", "--folds", "0", "--prompt_type", "", "--config",
                 str(tmp_path / "method.json"))
    argv[argv.index("--model_path") + 1] = str(recipe)
    assert main(argv) == 0
    fold = tmp_path / "out" / "full_finetune" / "tiny" / "0"
    start = tl.CellFMModel.from_pretrained(recipe).state_dict()
    trained = tl.CellFMForSequenceClassification.from_pretrained(fold)
    assert trained.config.freeze_preset == "cellfm" and trained.config.classifier_head == "mlp"
    assert torch.equal(trained.state_dict()["gene_emb"], start["gene_emb"])
    assert not torch.equal(trained.state_dict()["encoder.0.attn.q_proj.weight"], start["encoder.0.attn.q_proj.weight"])
    metrics = jf.read_json(fold / "metrics.json")
    assert metrics["total_parameters"] - metrics["trainable_parameters"] == start["gene_emb"].numel()


def test_cellfm_masking_collator_masks_a_fifth_of_each_cells_genes():
    from geneformer_peft.data.cellfm_collator import CellFMMaskingCollator

    features = [{"input_ids": np.arange(2, 2 + n), "values": np.linspace(0.5, 3.0, n).astype(np.float32)}
                for n in (10, 3, 1, 7)]
    batch = CellFMMaskingCollator(seed=1)(features)
    assert batch["value_mask"].sum(dim=1).tolist() == [2, 1, 1, 1]  # round(0.2 n), at least 1
    assert not bool((batch["value_mask"] & (batch["attention_mask"] == 0)).any())
    assert torch.equal(batch["labels"], batch["values"]) and batch["values"][1, 3:].abs().sum() == 0
    again = CellFMMaskingCollator(seed=1)(features)
    assert torch.equal(again["value_mask"], batch["value_mask"])


def test_cellfm_pretrain_from_config_and_from_checkpoint(cellfm_job, job_data, tmp_path, caplog, capsys):
    import transformerslocal as tl

    data = cellfm_job
    with caplog.at_level(logging.INFO):
        assert main(["pretrain", "--input", str(data.cells), "--output_dir", str(tmp_path / "scratch"), "--config",
                     str(data.model_path / "config.json"), "--epochs", "4", "--batch_size", "8", "--lr", "3e-3",
                     "--device", "cpu", "--token_dictionary", str(data.model_path / "tokenizer.json")]) == 0
    assert "masked-value loss (MSE) of predicting every masked value by its gene's mean alone" in caplog.text
    losses = [float(line.split()[-1]) for line in capsys.readouterr().out.splitlines() if "MLM loss" in line]
    assert len(losses) == 4 and losses[-1] < losses[0]
    model = tl.CellFMForMaskedValues.from_pretrained(tmp_path / "scratch")
    assert model.loading_info["missing_keys"] == [] and (tmp_path / "scratch" / "tokenizer.json").is_file()
    start = tl.CellFMForMaskedValues.from_pretrained(data.model_path)
    assert main(["pretrain", "--input", str(data.cells), "--output_dir", str(tmp_path / "more"), "--model_path",
                 str(data.model_path), "--max_steps", "3", "--batch_size", "8", "--device", "cpu"]) == 0
    more = tl.CellFMForMaskedValues.from_pretrained(tmp_path / "more")
    assert not torch.equal(more.gene_emb, start.gene_emb)
    assert not torch.equal(more.value_head.weight, start.value_head.weight)
    # the pretrained checkpoint is what the job fine-tunes
    argv = _argv(data, tmp_path / "ft", "--epoch", "1", "--folds", "0", "--prompt_type", "lora")
    argv[argv.index("--model_path") + 1] = str(tmp_path / "more")
    assert main(argv) == 0
    # rank-value cells are refused for a CellFM model, before anything is written
    caplog.clear()
    assert main(["pretrain", "--input", str(job_data.cells), "--output_dir", str(tmp_path / "x"), "--config",
                 str(data.model_path / "config.json"), "--max_steps", "1", "--device", "cpu"]) == 2
    assert "is rank_value-encoded" in caplog.text and not (tmp_path / "x").exists()


def test_cellfm_perturb_delete(cellfm_job, tmp_path):
    """``perturb --perturb_type delete`` on a CellFM fold: a cell's cosine similarity after deleting
    a gene is that of its cls state with and without the gene (and its value), the class
    probabilities move accordingly; other perturbation types are refused."""
    import transformerslocal as tl

    data = cellfm_job
    run = tmp_path / "runs"
    assert main(_argv(data, run, "--epoch", "1", "--folds", "0", "--prompt_type", "lora")) == 0
    fold = run / "lora" / "tiny" / "0"
    test = data.fold_file(0, "test")
    dataset = load_saved_dataset(test)
    vocab = {v: k for k, v in data.token_dictionary.items()}
    gene = vocab[dataset[0]["input_ids"][3]]
    out = tmp_path / "perturb"
    assert main(["perturb", "--model_path", str(fold), "--input", str(test), "--output_dir", str(out),
                 "--perturb_type", "delete", "--genes", gene, "--emb_mode", "cls", "--emb_layer", "0",
                 "--device", "cpu", "--no_plots", "--n_null", "2"]) == 0
    results = pd.read_parquet(out / "perturbations.parquet")
    row = results[(results["cell"] == 0) & ~results["is_null"]].iloc[0]
    model = tl.CellFMForSequenceClassification.from_pretrained(fold).eval()
    ids, values = dataset[0]["input_ids"], dataset[0]["values"]
    with torch.no_grad():
        full = model(torch.tensor([ids]), torch.tensor([values]), output_hidden_states=True)
        cut = model(torch.tensor([ids[:3] + ids[4:]]), torch.tensor([values[:3] + values[4:]]),
                    output_hidden_states=True)
    want = torch.nn.functional.cosine_similarity(full.hidden_states[-1][:, 0], cut.hidden_states[-1][:, 0]).item()
    assert row["cosine_sim"] == pytest.approx(want, abs=1e-5) and want < 1 - 1e-6
    delta = (cut.logits.softmax(-1) - full.logits.softmax(-1))[0].numpy()
    prob_columns = sorted(c for c in results.columns if c.startswith("prob_delta_"))
    np.testing.assert_allclose(row[prob_columns].to_numpy(dtype=float), delta, atol=1e-5)
    assert (out / "gene_stats.csv").is_file() and (out / "summary.json").is_file()
    assert main(["perturb", "--model_path", str(fold), "--input", str(test), "--output_dir", str(tmp_path / "o"),
                 "--perturb_type", "overexpress", "--genes", gene, "--no_plots"]) == 2


def test_check_tokenizes_raw_counts_for_a_cellfm_model(cellfm_job, tmp_path, caplog):
    from geneformer_peft.data.synthetic import generate_counts

    adata = generate_counts(n_cells=20, n_genes=200, n_cell_types=3, seed=0, class_proportions=[0.4, 0.35, 0.25])
    adata.write_h5ad(tmp_path / "raw.h5ad")
    out = tmp_path / "report.json"
    assert main(["check", "--model_path", str(cellfm_job.model_path), "--input", str(tmp_path / "raw.h5ad"),
                 "--output", str(out)]) == 0
    report = jf.read_json(out)["reports"]["input"]
    assert "cellfm, as the model reads" in json.dumps(report) and report["family"] == "cellfm"
    assert main(["check", "--model_path", str(cellfm_job.model_path), "--input", str(tmp_path / "raw.h5ad"),
                 "--gene_median_dictionary", str(tmp_path / "m.json")]) == 2
    assert "--gene_median_dictionary apply to the rank value encoding" in caplog.text


def test_search_on_cellfm(cellfm_job, tmp_path):
    """``search`` trains CellFM trials on ids and values, and its best config is one the job
    takes as ``--config`` on the CellFM checkpoint."""
    from geneformer_peft.models.loading import resolve_config

    data = cellfm_job
    space = tmp_path / "space.json"
    space.write_text(json.dumps({"lr": {"low": 1e-3, "high": 1e-2, "log": True}, "lora_r": {"choices": [2, 4]}}))
    out = tmp_path / "search"
    assert main(["search", "--dataset_name", data.dataset_name, "--data_path", str(data.data_path), "--model_path",
                 str(data.model_path), "--prompt_type", "lora", "--space", str(space), "--output_dir", str(out),
                 "--folds", "0", *FLAGS, "--epoch", "1", "--n_trials", "2"]) == 0
    best = json.loads((out / "best_flags.json").read_text())
    assert 0.0 <= best["validation_macro_f1"] <= 1.0
    config = resolve_config(data.model_path, config_path=out / "best_config.json")
    assert config.model_type == "cellfm" and config.lora_r == best["params"]["lora_r"]


def test_layer_decay_reads_cellfm_layers():
    """--layer_decay on CellFM: embeddings (gene, cls, value encoder) at the bottom, encoder.<i>
    at depth i + 1 (PEFT factors with their layer), the head at the peak rate."""
    import transformerslocal as tl
    from geneformer_peft.training.schedules import layer_index, make_optimizer

    config = tl.CellFMConfig(vocab_size=40, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                             intermediate_size=24, value_slots=16, max_genes=16, num_labels=3)
    model = tl.CellFMForSequenceClassification(config)
    assert [layer_index(n, 2) for n in ("gene_emb", "cls_token", "value_enc.value_enc.w1.weight",
                                        "encoder.0.attn.q_proj.weight", "encoder.1.ffn.o_proj.lora_A",
                                        "classifier.out.weight")] == [0, 0, 0, 1, 2, 3]
    rates = {id(p): g["lr"] for g in make_optimizer(model, lr=1e-3, weight_decay=0.0, layer_decay=0.5).param_groups
             for p in g["params"]}
    params = dict(model.named_parameters())
    assert rates[id(params["gene_emb"])] == pytest.approx(1e-3 * 0.5 ** 3)
    assert rates[id(params["encoder.1.attn.v_proj.weight"])] == pytest.approx(1e-3 * 0.5)
    assert rates[id(params["classifier.out.weight"])] == pytest.approx(1e-3)


def test_cells_of_another_vocabulary_are_refused_until_the_checkpoint_is_remapped(cellfm_job, tmp_path, caplog):
    """CellFM cells record the vocabulary they were tokenized with: on a checkpoint whose
    tokenizer.json maps the genes to other rows they are refused (exit 2, before training);
    remap-vocab onto that vocabulary makes them fit."""
    from geneformer_peft.data.vocab import save_tokenizer_json

    data = cellfm_job
    release = tmp_path / "release"
    shutil.copytree(data.model_path, release)
    genes = [g for g in data.token_dictionary if not g.startswith("<")]
    save_tokenizer_json({"<pad>": 0, "<mask>": 1, **{g: i + 2 for i, g in enumerate(reversed(genes))}}, release)
    argv = _argv(data, tmp_path / "out", "--epoch", "1", "--folds", "0", "--prompt_type", "lora")
    argv[argv.index("--model_path") + 1] = str(release)
    with caplog.at_level(logging.ERROR):
        assert main(argv) == 2
    assert "was tokenized with another vocabulary" in caplog.text and "remap-vocab" in caplog.text
    vocabulary = tmp_path / "lab.json"
    vocabulary.write_text(json.dumps(data.token_dictionary))
    assert main(["remap-vocab", "--model_path", str(release), "--token_dictionary", str(vocabulary),
                 "--output_dir", str(tmp_path / "remapped")]) == 0
    argv[argv.index("--model_path") + 1] = str(tmp_path / "remapped")
    assert main(argv) == 0
    report = json.dumps(jf.read_json(tmp_path / "out" / "lora" / "tiny" / "compatibility.json"))
    assert "tokenized with the model's own vocabulary" in report
