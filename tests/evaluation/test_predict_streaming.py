"""``predict`` reads the cells' tokens batch by batch (StreamedCells) and writes the CSV in
chunks: the output is the one of reading every cell into memory first (issue 25)."""
from __future__ import annotations

import numpy as np
import pyarrow as pa
import torch
from datasets import Dataset

import transformerslocal as tl
from geneformer_peft.data import cells as cells_module
from geneformer_peft.data.cells import EncodedCells
from geneformer_peft.evaluation import prediction
from geneformer_peft.evaluation.inference import predict_logits, softmax
from geneformer_peft.evaluation.outputs import write_predictions_csv
from geneformer_peft.evaluation.prediction import predict_cells

LABELS = ["B", "T", "NK"]


def _fold_and_cells(tmp_path, n_cells=45):
    torch.manual_seed(0)
    config = tl.BertConfig(vocab_size=40, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                           intermediate_size=37, max_position_embeddings=24, id2label=dict(enumerate(LABELS)))
    tl.BertForSequenceClassification(config).save_pretrained(tmp_path / "fold")
    rng = np.random.default_rng(0)
    ids = [rng.choice(np.arange(2, 40), size=int(rng.integers(3, 30)), replace=False).tolist() for _ in range(n_cells)]
    Dataset.from_dict({"input_ids": ids, "cell_type": [LABELS[i % 3] for i in range(n_cells)]}).save_to_disk(
        str(tmp_path / "cells.dataset"), num_shards=3)  # three Arrow files
    from geneformer_peft.data.dataset_io import load_saved_dataset

    return load_saved_dataset(tmp_path / "cells.dataset")


def test_streamed_prediction_writes_what_reading_everything_wrote(tmp_path, monkeypatch):
    dataset = _fold_and_cells(tmp_path)
    maps = []
    real_map = pa.memory_map
    monkeypatch.setattr(pa, "memory_map", lambda *a, **k: maps.append(a[0]) or real_map(*a, **k))
    monkeypatch.setattr(cells_module, "REMAP_EVERY_BATCHES", 2)
    monkeypatch.setattr(prediction, "CSV_CHUNK_ROWS", 7)
    frame, metrics = predict_cells(tmp_path / "fold", dataset, output=tmp_path / "p.csv", batch_size=4, device="cpu")
    # 12 batches, files mapped afresh every 2: 6 mappings of the 3 files
    assert len(maps) == 6 * 3

    # the former way: every cell's tokens in memory, the table formatted in one piece
    from geneformer_peft.models.loading import load_fold_model

    model = load_fold_model(tmp_path / "fold")
    label2id = {n: i for i, n in enumerate(LABELS)}
    cells = EncodedCells.from_dataset(dataset, label_column="cell_type", label2id=label2id, max_length=24,
                                      name="input")
    probs = softmax(predict_logits(model, cells, batch_size=4, device=torch.device("cpu")))
    write_predictions_csv(tmp_path / "expected.csv", cell_index=cells.index, label_names=LABELS,
                          pred_ids=probs.argmax(axis=1), probabilities=probs, true_ids=cells.labels)
    assert (tmp_path / "p.csv").read_bytes() == (tmp_path / "expected.csv").read_bytes()
    assert len(frame) == 45 and metrics is not None
