"""CellFM's fine-tuning recipe: remap-vocab on a CellFM checkpoint (shared genes keep their
gene_emb rows, or with --reinit_all_rows none does) and freeze_preset "cellfm" (the gene
embedding frozen, everything else trained)."""
from __future__ import annotations

import json
import math

import pytest
import torch

import transformerslocal as tl
from geneformer_peft.cli import main
from geneformer_peft.data.vocab import save_tokenizer_json
from transformerslocal import mark_trainable

SIZES = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=24, value_slots=16,
             max_genes=16)
OLD_GENES = [f"G{i}" for i in range(1, 40)]


@pytest.fixture
def checkpoint(tmp_path):
    """A tiny CellFM (pad row 0 + 39 genes, 40 rows) with a release-like tokenizer.json."""
    torch.manual_seed(0)
    vocab = {"<pad>": 0, **{g: i + 1 for i, g in enumerate(OLD_GENES)}}
    tl.CellFMModel(tl.CellFMConfig(vocab_size=40, **SIZES)).save_pretrained(tmp_path / "ckpt")
    save_tokenizer_json(vocab, tmp_path / "ckpt")
    # the lab's genes: 30 shared (in another order) and 5 the release lacks
    lab = {"<pad>": 0, "<mask>": 1}
    for gene in list(reversed(OLD_GENES[:30])) + [f"NEW{i}" for i in range(5)]:
        lab[gene] = len(lab)
    (tmp_path / "lab.json").write_text(json.dumps(lab))
    return tmp_path / "ckpt", vocab, lab


def test_remap_keeps_the_rows_of_shared_genes(checkpoint, tmp_path):
    ckpt, old, lab = checkpoint
    assert main(["remap-vocab", "--model_path", str(ckpt), "--token_dictionary", str(tmp_path / "lab.json"),
                 "--output_dir", str(tmp_path / "remapped")]) == 0
    before = tl.CellFMModel.from_pretrained(ckpt).state_dict()
    after_model = tl.CellFMModel.from_pretrained(tmp_path / "remapped")
    after = after_model.state_dict()
    assert after_model.config.vocab_size == 40  # 37 tokens, padded to a multiple of 8
    for gene in OLD_GENES[:30]:
        assert torch.equal(after["gene_emb"][lab[gene]], before["gene_emb"][old[gene]])
    assert torch.equal(after["gene_emb"][0], before["gene_emb"][0])
    fresh = torch.stack([after["gene_emb"][lab[f"NEW{i}"]] for i in range(5)])
    assert not any(torch.equal(row, old_row) for row in fresh for old_row in before["gene_emb"])
    assert fresh.std().item() == pytest.approx(math.sqrt(2 / (40 + 32)), rel=0.35)  # xavier-normal
    assert all(torch.equal(after[k], v) for k, v in before.items() if k != "gene_emb")
    record = json.loads((tmp_path / "remapped" / "vocabulary_remap.json").read_text())
    assert record["new_genes"] == sorted(f"NEW{i}" for i in range(5)) and record["n_pretrained_genes"] == 30


def test_reinit_all_rows_keeps_no_pretrained_row(checkpoint, tmp_path):
    ckpt, old, lab = checkpoint
    assert main(["remap-vocab", "--model_path", str(ckpt), "--token_dictionary", str(tmp_path / "lab.json"),
                 "--output_dir", str(tmp_path / "recipe"), "--reinit_all_rows"]) == 0
    before = tl.CellFMModel.from_pretrained(ckpt).state_dict()
    after = tl.CellFMModel.from_pretrained(tmp_path / "recipe").state_dict()
    emb = after["gene_emb"]
    assert emb.shape == (40, 32) and torch.count_nonzero(emb[0]) == 0  # the pad row is 0
    assert not any(torch.equal(emb[lab[g]], before["gene_emb"][old[g]]) for g in OLD_GENES[:30])
    assert all(torch.equal(after[k], v) for k, v in before.items() if k != "gene_emb")
    record = json.loads((tmp_path / "recipe" / "vocabulary_remap.json").read_text())
    assert record["n_pretrained_genes"] == 0 and len(record["new_genes"]) == 35


def test_freeze_preset_cellfm_freezes_the_gene_embedding_alone():
    config = tl.CellFMConfig(vocab_size=40, num_labels=3, classifier_head="mlp", freeze_preset="cellfm", **SIZES)
    model = tl.CellFMForSequenceClassification(config)
    report = mark_trainable(model)
    frozen = [n for n, p in model.named_parameters() if not p.requires_grad]
    assert frozen == ["gene_emb"]
    assert report.trainable == report.total - 40 * 32
    assert "freeze_preset" in config.to_dict() and tl.CellFMConfig(**config.to_dict()).freeze_preset == "cellfm"
    for bad, said in (({"freeze_preset": "scbert"}, "null or one of \\['cellfm'\\]"),
                      ({"freeze_preset": "cellfm", "freeze_layers": 1}, "null when freeze_layers is set"),
                      ({"freeze_preset": "cellfm", "prompt_type": "lora"}, "null when prompt_type lists PEFT")):
        with pytest.raises(ValueError, match=said):
            tl.CellFMConfig(vocab_size=40, **SIZES, **bad)
