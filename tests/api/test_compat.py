"""geneformer_peft.compat: Geneformer-style calls (its class and argument names) give what the
Python API gives, and every argument this project does not support is refused by name."""
from __future__ import annotations

import pickle

import numpy as np
import pandas as pd
import pytest

import geneformer_peft as gp
from geneformer_peft.compat import (Classifier, EmbExtractor, InSilicoPerturber, InSilicoPerturberStats,
                                    TranscriptomeTokenizer, UnsupportedArgument)
from geneformer_peft.data.dataset_io import load_saved_dataset
from api_factories import make_adata as _adata

import job_factories as jf


def test_transcriptome_tokenizer(tmp_path, vocab):
    (tmp_path / "raw").mkdir()
    adata = _adata()
    adata.obs["organ_major"] = "lung"
    adata.write_h5ad(tmp_path / "raw" / "cells.h5ad")
    tk = TranscriptomeTokenizer({"cell_type": "cell_type", "organ_major": "organ"}, nproc=4, model_input_size=64,
                                token_dictionary_file=vocab[0], gene_median_file=vocab[1])
    tk.tokenize_data(tmp_path / "raw", tmp_path / "out", "tiny", file_format="h5ad")
    saved = load_saved_dataset(tmp_path / "out" / "tiny.dataset")
    expected = gp.tokenize(adata, token_dictionary=vocab[0], gene_median_dictionary=vocab[1], model_input_size=64,
                           label_column="cell_type", progress=False)
    assert saved["input_ids"] == expected["input_ids"] and saved["cell_type"] == expected["cell_type"]
    assert set(saved["organ"]) == {"lung"}
    with pytest.raises(UnsupportedArgument, match="gene_mapping_file='map.pkl'"):
        TranscriptomeTokenizer(gene_mapping_file="map.pkl", token_dictionary_file=vocab[0], gene_median_file=vocab[1])
    with pytest.raises(UnsupportedArgument, match="collapse_gene_ids=False"):
        TranscriptomeTokenizer(collapse_gene_ids=False, token_dictionary_file=vocab[0], gene_median_file=vocab[1])
    with pytest.raises(UnsupportedArgument, match=r"special_token=True.*model_version='V1'"):
        TranscriptomeTokenizer(special_token=True, token_dictionary_file=vocab[0], gene_median_file=vocab[1])
    with pytest.raises(UnsupportedArgument, match="token_dictionary_file=None.*ships no Geneformer dictionaries"):
        TranscriptomeTokenizer()


def test_classifier_cross_validation_is_the_commands(tmp_path, job_data, finished_runs):
    training_args = {"num_train_epochs": 2, "learning_rate": 3e-3, "per_device_train_batch_size": 16, "seed": 0,
                     "evaluation_strategy": "epoch", "output_dir": "ignored"}
    cc = Classifier(classifier="cell", cell_state_dict={"state_key": "cell_type", "states": "all"},
                    training_args=training_args, num_crossval_splits=2,
                    split_sizes={"train": 0.4, "valid": 0.1, "test": 0.5}, forward_batch_size=32,
                    prompt_type="lora", device="cpu", progress=False)
    cc.prepare_data(input_data_file=job_data.cells, output_directory=tmp_path, output_prefix="tiny")
    classes = pickle.loads((tmp_path / "tiny_id_class_dict.pkl").read_bytes())
    assert sorted(classes.values()) == list(job_data.labels)
    metrics = cc.validate(model_directory=job_data.model_path, prepared_input_data_file=tmp_path / "tiny_labeled.dataset",
                          id_class_dict_file=tmp_path / "tiny_id_class_dict.pkl", output_directory=tmp_path,
                          output_prefix="tiny")
    cli = finished_runs("lora")
    for fold in (0, 1):  # same folds (split_sizes -> 2 folds, validation 0.2 of the rest), same training
        theirs = jf.read_json(cli / str(fold) / "metrics.json")
        assert metrics["macro_f1"][fold] == pytest.approx(theirs["macro_f1"])
        mine = cc.result.fold(fold).metrics
        assert {k: v for k, v in jf.result_metrics(mine).items() if k != "prompt_type"} == \
            {k: v for k, v in jf.result_metrics(theirs).items() if k != "prompt_type"}
    assert int(metrics["conf_matrix"].to_numpy().sum()) == 100
    evaluated = cc.evaluate_saved_model(cc.result.fold(0).folder, tmp_path / "tiny_id_class_dict.pkl",
                                        job_data.fold_file(0, "test"), tmp_path, "eval")
    assert evaluated["macro_f1"] == pytest.approx(metrics["macro_f1"][0])
    assert (tmp_path / "eval_pred.csv").is_file()


@pytest.mark.parametrize("kwargs, named", [
    ({"classifier": "gene"}, "classifier='gene'"),
    ({"freeze_layers": 2}, "freeze_layers=2"),
    ({"training_args": {"gradient_accumulation_steps": 4}}, r"training_args\['gradient_accumulation_steps'\]=4"),
    ({"training_args": {"load_best_model_at_end": False}}, r"training_args\['load_best_model_at_end'\]=False"),
    ({"quantize": True}, "quantize=True"),
    ({"cell_state_dict": None}, "cell_state_dict=None"),
    ({"split_sizes": {"train": 0.7, "valid": 0.0, "test": 0.3}}, "split_sizes="),
])
def test_classifier_refuses_what_it_does_not_support(kwargs, named):
    options = {"cell_state_dict": {"state_key": "cell_type", "states": "all"}, **kwargs}
    with pytest.raises(UnsupportedArgument, match=named):
        Classifier(**options)


def test_emb_extractor_gives_gp_embed(tmp_path, job_data, vocab):
    embex = EmbExtractor(model_type="Pretrained", num_classes=0, emb_mode="cell", filter_data={"cell_type": ["B cell"]},
                         max_ncells=None, emb_layer=-1, emb_label=["cell_type"], labels_to_plot=["cell_type"],
                         forward_batch_size=16, nproc=16, token_dictionary_file=vocab[0])
    embs = embex.extract_embs(job_data.model_path, job_data.cells, tmp_path, "tiny")
    dataset = load_saved_dataset(job_data.cells)
    rows = [i for i, v in enumerate(dataset["cell_type"]) if v == "B cell"]
    expected = gp.embed(dataset.select(rows), model=job_data.model_path, token_dictionary=vocab[0])
    np.testing.assert_allclose(embs.drop(columns=["cell_type"]).to_numpy(), expected.obsm["X_geneformer"], rtol=1e-6)
    assert set(embs["cell_type"]) == {"B cell"} and (tmp_path / "tiny.csv").is_file()
    paths = embex.plot_embs(embs, "heatmap", tmp_path, "tiny")
    assert [p.name for p in paths] == ["tiny_heatmap_cell_type.png"] and paths[0].is_file()
    with pytest.raises(UnsupportedArgument, match="summary_stat='exact_mean'"):
        EmbExtractor(summary_stat="exact_mean")
    with pytest.raises(UnsupportedArgument, match="output_torch_embs=True"):
        embex.extract_embs(job_data.model_path, job_data.cells, tmp_path, "tiny", output_torch_embs=True)


def test_in_silico_perturber_and_stats(tmp_path, job_data, vocab):
    isp = InSilicoPerturber(perturb_type="delete", genes_to_perturb="all", model_type="Pretrained", emb_mode="cell",
                            max_ncells=6, emb_layer=-1, forward_batch_size=32, nproc=8,
                            token_dictionary_file=vocab[0])
    stats = isp.perturb_data(job_data.model_path, job_data.cells, tmp_path, "scan")
    expected = gp.perturb(job_data.cells, model=job_data.model_path, genes="all", max_ncells=6,
                          token_dictionary=vocab[0])
    pd.testing.assert_frame_equal(stats, expected)
    ispstats = InSilicoPerturberStats(mode="vs_null", genes_perturbed="all")
    read = ispstats.get_stats(tmp_path / "scan", None, tmp_path, "scan_stats")
    pd.testing.assert_frame_equal(read, pd.read_csv(tmp_path / "scan" / "gene_stats.csv"))
    assert (tmp_path / "scan_stats.csv").is_file()
    with pytest.raises(UnsupportedArgument, match="mode='goal_state_shift'.*without cell_states_to_model"):
        InSilicoPerturberStats(mode="goal_state_shift").get_stats(tmp_path / "scan", None, tmp_path, "x")
    with pytest.raises(UnsupportedArgument, match="null_dist_data_directory='null'"):
        ispstats.get_stats(tmp_path / "scan", "null", tmp_path, "x")
    with pytest.raises(UnsupportedArgument, match="mode='mixture_model'"):
        InSilicoPerturberStats()
    with pytest.raises(UnsupportedArgument, match="combos=1"):
        InSilicoPerturber(combos=1)
    with pytest.raises(UnsupportedArgument, match="perturb_rank_shift=2"):
        InSilicoPerturber(perturb_type="delete", perturb_rank_shift=2)
