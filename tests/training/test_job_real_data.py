"""The job on real cells: CellBench CEL-seq2 (5 lung cancer cell lines), tokenized with the
Geneformer V1 dictionaries, fine-tuned from a tiny random checkpoint of the V1 vocabulary size."""
from __future__ import annotations


import pytest

import job_factories as jf

H5AD = jf.SHARED_DATA / "cellbench_celseq2_5cl.h5ad"
TOKENS = jf.SHARED_DATA / "geneformer_v1_token_dictionary.pkl"
MEDIANS = jf.SHARED_DATA / "geneformer_v1_gene_median_dictionary.pkl"

pytestmark = pytest.mark.skipif(not all(p.is_file() for p in (H5AD, TOKENS, MEDIANS)),
                                reason=f"real data (CellBench h5ad and V1 dictionaries) absent from {jf.SHARED_DATA}")


def test_cellbench_fold_beats_chance(tmp_path):
    import datasets

    from geneformer_peft.data.folds import split_folds
    from geneformer_peft.data.rank_value import tokenize_anndata
    from geneformer_peft.data.vocab import load_token_dictionary

    datasets.disable_progress_bars()
    cells = tokenize_anndata(H5AD, token_dictionary=TOKENS, gene_median_dictionary=MEDIANS, label_column="cell_type",
                             obs_filter={"demuxlet_cls": "SNG"}, model_input_size=256, show_progress=False)
    assert len(cells) == 571 and max(cells["length"]) <= 256
    assert len(set(cells["cell_type"])) == 5
    split_folds(cells, dataset_name="cellbench", output_dir=tmp_path / "folds", n_folds=3, seed=0)
    vocab_size = len(load_token_dictionary(TOKENS))
    assert vocab_size == 25426
    jf.make_tiny_checkpoint(tmp_path / "ckpt", vocab_size=vocab_size, max_position_embeddings=256)

    argv = ["--dataset_name", "cellbench", "--data_path", str(tmp_path / "folds"), "--model_path",
            str(tmp_path / "ckpt"), "--output_path", str(tmp_path / "out"), "--prompt_type", "", "--folds", "0",
            "--epoch", "4", "--lr", "3e-3", "--batch_size", "16", "--no_progress", "--device", "cpu"]
    assert jf.run_finetune(argv) == 0
    metrics = jf.read_json(tmp_path / "out" / "full_finetune" / "cellbench" / "0" / "metrics.json")
    assert metrics["n_cells"] > 180
    # 5 classes: chance macro-F1 is about 0.2
    assert metrics["macro_f1"] > 0.5, metrics["per_class"]
