"""``geneformer-peft convert-cellfm``: a .ckpt in the released layout (written by our writer) converts
into a folder that loads exactly; the gene table becomes tokenizer.json; bad input exits 2 and
leaves no folder behind."""
from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from cellfm_factories import TINY_RELEASE, released_tensors

import transformerslocal as tl
from geneformer_peft.cli import main
from geneformer_peft.data.vocab import load_token_dictionary
from transformerslocal.convert_cellfm import write_mindspore_checkpoint

ROOT = Path(__file__).resolve().parents[2]
N_GENES = TINY_RELEASE["vocab_size"] - 3  # 21 genes + pad = 22 rows, padded to 24


@pytest.fixture()
def release(tmp_path):
    tensors = released_tensors()
    return tensors, write_mindspore_checkpoint(tmp_path / "CellFM_tiny_weight.ckpt", tensors, crc_trailer=True)


def _gene_table(path: Path, genes: list[str], *, header: str = ",gene_name,ensembl_id") -> Path:
    lines = [header] + [f"{i},{g},ENSG{i:05d}" for i, g in enumerate(genes)]
    path.write_text("\n".join(lines) + "\n")
    return path


def test_converts_with_gene_table(tmp_path, release):
    tensors, ckpt = release
    genes = [f"GENE{i}" for i in range(N_GENES)]
    table = _gene_table(tmp_path / "expand_gene_info.csv", genes)
    out = tmp_path / "converted"
    assert main(["convert-cellfm", "--checkpoint", str(ckpt), "--output_dir", str(out), "--num_attention_heads", "4",
                 "--gene_table", str(table), "--max_genes", "100"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors", "provenance.json", "tokenizer.json"]
    config = json.loads((out / "config.json").read_text())
    assert (config["model_type"], config["num_attention_heads"], config["max_genes"]) == ("cellfm", 4, 100)
    vocab = load_token_dictionary(out / "tokenizer.json")
    assert vocab["<pad>"] == 0 and vocab["GENE0"] == 1 and vocab[f"GENE{N_GENES - 1}"] == N_GENES
    model = tl.CellFMModel.from_pretrained(out)
    assert np.array_equal(model.gene_emb.detach().numpy(), tensors["gene_emb"])
    assert np.array_equal(model.encoder[1].post_norm2.bias.detach().numpy(), tensors["encoder.1.post_norm2.beta"])


def test_not_a_checkpoint_exits_2_naming_it_and_writes_nothing(tmp_path):
    bogus = tmp_path / "weights.ckpt"
    bogus.write_text("this is a text file, not a checkpoint\n")
    out = tmp_path / "converted"
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    result = subprocess.run([sys.executable, "-m", "geneformer_peft.cli", "convert-cellfm", "--checkpoint",
                             str(bogus), "--output_dir", str(out)], capture_output=True, text=True, env=env,
                            cwd=tmp_path, timeout=120)
    assert result.returncode == 2
    assert "weights.ckpt" in result.stderr and "not a MindSpore checkpoint" in result.stderr
    assert not out.exists() and [p.name for p in tmp_path.iterdir()] == ["weights.ckpt"]


def test_gene_table_of_another_size_exits_2(tmp_path, release, caplog):
    _, ckpt = release
    table = _gene_table(tmp_path / "genes.csv", [f"G{i}" for i in range(N_GENES + 5)])
    out = tmp_path / "converted"
    assert main(["convert-cellfm", "--checkpoint", str(ckpt), "--output_dir", str(out),
                 "--gene_table", str(table)]) == 2
    assert "26 genes (+ the pad row) for a gene embedding of 24 rows" in caplog.text
    assert not out.exists()


def test_repeated_gene_exits_2_naming_the_lines(tmp_path, release, caplog):
    _, ckpt = release
    genes = [f"G{i}" for i in range(N_GENES)]
    genes[5] = "G1"
    table = _gene_table(tmp_path / "genes.csv", genes)
    assert main(["convert-cellfm", "--checkpoint", str(ckpt), "--output_dir", str(tmp_path / "o"),
                 "--gene_table", str(table)]) == 2
    assert "gene 'G1' in column 'gene_name' is on line 3 and on line 7" in caplog.text


def test_unknown_entry_stops_unless_drop_unknown(tmp_path, caplog):
    tensors = released_tensors(moments=False)
    tensors["mystery.weight"] = np.ones((2, 2), np.float32)
    ckpt = write_mindspore_checkpoint(tmp_path / "x.ckpt", tensors)
    assert main(["convert-cellfm", "--checkpoint", str(ckpt), "--output_dir", str(tmp_path / "o")]) == 2
    assert "mystery.weight" in caplog.text and "--drop_unknown" in caplog.text
    assert not (tmp_path / "o").exists()
    with caplog.at_level(logging.INFO, logger="transformerslocal"):
        assert main(["convert-cellfm", "--checkpoint", str(ckpt), "--output_dir", str(tmp_path / "o"),
                     "--drop_unknown"]) == 0
    assert "dropped 1 (unknown): mystery.weight" in caplog.text


def test_existing_output_is_kept_unless_overwrite(tmp_path, release):
    _, ckpt = release
    out = tmp_path / "converted"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert main(["convert-cellfm", "--checkpoint", str(ckpt), "--output_dir", str(out)]) == 2
    assert (out / "keep.txt").read_text() == "mine"
    assert main(["convert-cellfm", "--checkpoint", str(ckpt), "--output_dir", str(out), "--overwrite"]) == 0
    assert not (out / "keep.txt").exists() and (out / "model.safetensors").is_file()
