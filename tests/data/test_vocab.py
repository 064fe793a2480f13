"""Vocabularies: loading, tokenizer.json, building from counts, checkpoint remapping."""

from __future__ import annotations

import json
import pickle

import numpy as np
import pytest
import scipy.sparse as sp
import torch
from data_factories import SHARED_DATA, gene_ids, make_adata, make_vocab

from geneformer_peft.data.vocab import (
    build_vocabulary,
    load_gene_median_dictionary,
    load_token_dictionary,
    save_tokenizer_json,
    write_dictionaries,
)
from geneformer_peft.errors import DataError
from geneformer_peft.models.vocabulary import remap_checkpoint_vocabulary


def test_load_real_v1_dictionaries():
    path = SHARED_DATA / "geneformer_v1_token_dictionary.pkl"
    if not path.exists():
        pytest.skip(f"{path} not found")
    tokens = load_token_dictionary(path)
    assert len(tokens) == 25_426 and tokens["<pad>"] == 0 and tokens["<mask>"] == 1
    assert all(type(v) is int for v in tokens.values())
    medians = load_gene_median_dictionary(SHARED_DATA / "geneformer_v1_gene_median_dictionary.pkl")
    assert len(medians) == 25_424 and all(type(v) is float for v in medians.values())


def test_numpy_ids_and_tokenizer_json_roundtrip(tmp_path):
    tokens = {"<pad>": np.int16(0), "<mask>": np.int16(1), "<cls>": 2, "<eos>": 3}
    tokens.update({g: np.int16(4 + i) for i, g in enumerate(gene_ids(50))})
    pkl = tmp_path / "tokens.pkl"
    pkl.write_bytes(pickle.dumps(tokens))
    loaded = load_token_dictionary(pkl)
    assert loaded == {k: int(v) for k, v in tokens.items()}
    path = save_tokenizer_json(loaded, tmp_path / "tok")
    assert load_token_dictionary(path) == loaded
    assert load_token_dictionary(tmp_path / "tok") == loaded  # directory form

    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(path))
    ids = tokenizer.encode(f"<cls> {gene_ids(50)[3]} <mask> <eos>").ids
    assert ids == [2, 7, 1, 3]


def test_bad_dictionaries(tmp_path):
    (tmp_path / "dup.pkl").write_bytes(pickle.dumps({"<pad>": 0, "A": 1, "B": 1}))
    with pytest.raises(DataError, match=r"dup\.pkl: token ids \[1\] are used twice"):
        load_token_dictionary(tmp_path / "dup.pkl")
    (tmp_path / "med.pkl").write_bytes(pickle.dumps({"ENSG1": 0.0}))
    with pytest.raises(DataError, match=r"med\.pkl: gene 'ENSG1' has median 0\.0; expected a finite number > 0"):
        load_gene_median_dictionary(tmp_path / "med.pkl")
    with pytest.raises(DataError, match=r"holds no token dictionary"):
        load_token_dictionary(tmp_path)


@pytest.mark.parametrize("version", ["V1", "V2"])
def test_build_vocabulary_medians(tmp_path, version):
    adata = make_adata(70, 20, seed=4, density=0.4)
    X = adata.X.toarray()
    X[:, 5] = 0  # an undetected gene gets no token
    adata.X = sp.csr_matrix(X)
    path = tmp_path / "a.h5ad"
    adata.write_h5ad(path)
    tokens, medians = build_vocabulary(str(path), model_version=version, chunk_size=16, show_progress=False)
    X = adata.X.toarray().astype(np.float64)
    normalised = X / X.sum(axis=1, keepdims=True) * 10_000
    expected = {}
    for j, gene in enumerate(adata.var_names):
        nonzero = normalised[:, j][normalised[:, j] > 0]
        if nonzero.size:
            expected[gene] = float(np.median(nonzero))
    assert medians.keys() == expected.keys() and gene_ids(20)[5] not in medians
    for gene in expected:
        assert medians[gene] == pytest.approx(expected[gene], rel=1e-12)
    specials = ["<pad>", "<mask>"] + (["<cls>", "<eos>"] if version == "V2" else [])
    assert list(tokens)[: len(specials)] == specials
    assert list(tokens.values()) == list(range(len(tokens)))
    assert list(tokens)[len(specials):] == sorted(expected)

    token_path, median_path = write_dictionaries(tmp_path / "vocab", tokens, medians)
    assert load_token_dictionary(token_path) == tokens
    assert load_gene_median_dictionary(median_path) == medians
    assert load_token_dictionary(tmp_path / "vocab" / "tokenizer.json") == tokens
    with pytest.raises(DataError, match="file exists"):
        write_dictionaries(tmp_path / "vocab", tokens, medians)


def _write_checkpoint(directory, old_tokens, *, fmt="safetensors", hidden=6, tied_decoder=False):
    directory.mkdir()
    vocab_size = len(old_tokens) + 3  # the old matrix is padded too
    config = {"vocab_size": vocab_size, "hidden_size": hidden, "initializer_range": 0.02, "model_type": "bert"}
    (directory / "config.json").write_text(json.dumps(config))
    g = torch.Generator().manual_seed(1)
    state = {
        "bert.embeddings.word_embeddings.weight": torch.randn(vocab_size, hidden, generator=g),
        "bert.embeddings.position_embeddings.weight": torch.randn(16, hidden, generator=g),
        "bert.encoder.layer.0.attention.self.query.weight": torch.randn(hidden, hidden, generator=g),
        "cls.predictions.bias": torch.randn(vocab_size, generator=g),
    }
    if tied_decoder:
        state["cls.predictions.decoder.weight"] = state["bert.embeddings.word_embeddings.weight"].clone()
    if fmt == "safetensors":
        from safetensors.torch import save_file

        save_file(state, str(directory / "model.safetensors"))
    else:
        torch.save(state, directory / "pytorch_model.bin")
    save_tokenizer_json(old_tokens, directory)
    return state


@pytest.mark.parametrize("fmt", ["safetensors", "bin"])
def test_remap_checkpoint_vocabulary(tmp_path, fmt):
    old_tokens, _ = make_vocab(gene_ids(30), seed=0)
    new_tokens, _ = make_vocab(gene_ids(30, offset=20), seed=5)  # 10 genes shared (21..30)
    old_state = _write_checkpoint(tmp_path / "old", old_tokens, fmt=fmt, tied_decoder=fmt == "bin")
    n_shared = remap_checkpoint_vocabulary(tmp_path / "old", new_tokens, tmp_path / "new", pad_to_multiple_of=8)
    assert n_shared == 10

    config = json.loads((tmp_path / "new" / "config.json").read_text())
    assert config["vocab_size"] == 32 and config["hidden_size"] == 6  # 32 tokens -> multiple of 8
    if fmt == "safetensors":
        from safetensors.torch import load_file

        new_state = load_file(str(tmp_path / "new" / "model.safetensors"))
    else:
        new_state = torch.load(tmp_path / "new" / "pytorch_model.bin", weights_only=True)
    assert new_state.keys() == old_state.keys()
    emb_key = "bert.embeddings.word_embeddings.weight"
    new_emb, old_emb = new_state[emb_key], old_state[emb_key]
    assert new_emb.shape == (32, 6)
    for token, new_id in new_tokens.items():
        if token in old_tokens:  # shared genes and <pad>/<mask>
            assert torch.equal(new_emb[new_id], old_emb[old_tokens[token]])
            assert new_state["cls.predictions.bias"][new_id] == old_state["cls.predictions.bias"][old_tokens[token]]
    fresh = [i for t, i in new_tokens.items() if t not in old_tokens]
    assert 0 < new_emb[fresh].std() < 0.05
    assert torch.all(new_state["cls.predictions.bias"][fresh] == 0)
    for key in old_state:
        if key not in (emb_key, "cls.predictions.bias", "cls.predictions.decoder.weight"):
            assert torch.equal(new_state[key], old_state[key])
    if fmt == "bin":
        assert torch.equal(new_state["cls.predictions.decoder.weight"], new_emb)
    assert load_token_dictionary(tmp_path / "new") == new_tokens


def test_remap_needs_old_vocabulary(tmp_path):
    old_tokens, _ = make_vocab(gene_ids(5))
    _write_checkpoint(tmp_path / "ckpt", old_tokens)
    (tmp_path / "ckpt" / "tokenizer.json").unlink()
    with pytest.raises(DataError, match=r"old vocabulary unknown; looked for .*tokenizer\.json"):
        remap_checkpoint_vocabulary(tmp_path / "ckpt", old_tokens, tmp_path / "out")
    n = remap_checkpoint_vocabulary(tmp_path / "ckpt", old_tokens, tmp_path / "out", old_token_dictionary=old_tokens,
                                    pad_to_multiple_of=None)
    assert n == 5
    assert json.loads((tmp_path / "out" / "config.json").read_text())["vocab_size"] == 7


def test_remap_reads_a_sharded_checkpoint_and_writes_the_folder_atomically(tmp_path, monkeypatch):
    old_tokens, _ = make_vocab(gene_ids(12), seed=0)
    new_tokens, _ = make_vocab(gene_ids(12, offset=6), seed=1)
    old_state = _write_checkpoint(tmp_path / "old", old_tokens, fmt="safetensors")
    # split the weights over two shards with an index, as large HF checkpoints are stored
    from safetensors.torch import save_file

    keys = sorted(old_state)
    shards = {"model-00001-of-00002.safetensors": keys[: len(keys) // 2],
              "model-00002-of-00002.safetensors": keys[len(keys) // 2:]}
    for name, part in shards.items():
        save_file({k: old_state[k].contiguous() for k in part}, str(tmp_path / "old" / name))
    (tmp_path / "old" / "model.safetensors").unlink()
    (tmp_path / "old" / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {k: name for name, part in shards.items() for k in part}}))
    assert remap_checkpoint_vocabulary(tmp_path / "old", new_tokens, tmp_path / "new") == 6
    assert (tmp_path / "new" / "model.safetensors").is_file()

    import geneformer_peft.models.vocabulary as vocabulary

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(vocabulary, "save_tokenizer_json", broken)
    with pytest.raises(OSError, match="disk full"):
        remap_checkpoint_vocabulary(tmp_path / "old", new_tokens, tmp_path / "again")
    assert not (tmp_path / "again").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith("again")], "no half-written folder is left"
