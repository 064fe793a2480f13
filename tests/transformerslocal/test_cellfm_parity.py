"""Parity with the original CellFM code: ../shared/cellfm holds a checkpoint its MindSpore code wrote
(random weights, 48 dims, 2 layers, 4 heads, 30 genes) and that code's outputs on 5 cells. The
converted checkpoint must reproduce them at the cls and every real gene token (skipped when absent)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import transformerslocal as tl
from cellfm_factories import SHARED_CELLFM
from transformerslocal.convert_cellfm import convert_cellfm_checkpoint, read_mindspore_checkpoint, \
    write_mindspore_checkpoint

CKPT = SHARED_CELLFM / "cellfm_tiny.ckpt"
IO = SHARED_CELLFM / "cellfm_tiny_io.npz"

pytestmark = pytest.mark.skipif(not (CKPT.is_file() and IO.is_file()),
                                reason=f"the CellFM reference is not at {SHARED_CELLFM}")


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    io = dict(np.load(IO))
    dims, layers, heads, genes = (int(v) for v in io["config"])
    out = tmp_path_factory.mktemp("cellfm") / "tiny"
    report = convert_cellfm_checkpoint(CKPT, out, num_attention_heads=heads, max_genes=io["gene"].shape[1])
    model = tl.CellFMModel.from_pretrained(out)
    assert (model.config.hidden_size, model.config.num_hidden_layers, model.config.num_attention_heads) == (
        dims, layers, heads)
    assert model.config.vocab_size >= genes + 1
    return model, io, report


def test_every_tensor_of_the_reference_checkpoint_is_kept(converted):
    model, _, report = converted
    assert report.dropped == {}
    assert sorted(report.kept.values()) == sorted(model.state_dict())


@pytest.mark.parametrize("masked", [False, True])
def test_converted_checkpoint_reproduces_the_original_outputs(converted, masked):
    model, io, _ = converted
    ids = torch.from_numpy(io["gene"]).long()
    mask = torch.from_numpy(io["zero_idx"][:, 1:])  # zero_idx: cls first, then the genes
    if masked:
        values = torch.from_numpy(io["expr_masked"][..., 1])
        value_mask = torch.from_numpy(io["expr_masked"][..., 0] == 0)
        expected = io["out_masked"]
        assert value_mask[:, 1].all() and int(value_mask.sum()) == ids.shape[0]  # the second gene of every cell
    else:
        values, value_mask, expected = torch.from_numpy(io["expr"]), None, io["out"]
    with torch.no_grad():
        out = model(ids, values, mask, value_mask).last_hidden_state.numpy()
    assert out.shape == expected.shape
    real = io["zero_idx"].astype(bool)  # the cls and every real gene token
    assert np.abs(out - expected)[real].max() < 1e-4
    assert np.abs(expected[real]).max() > 1.0  # the reference is not trivially small


def test_our_writer_rewrites_the_reference_file_byte_for_byte(tmp_path):
    tensors = read_mindspore_checkpoint(CKPT)
    again = write_mindspore_checkpoint(tmp_path / "again.ckpt", tensors)
    assert again.read_bytes() == CKPT.read_bytes()
