"""The MindSpore .ckpt reader and writer, and the conversion of a released-layout CellFM checkpoint."""
from __future__ import annotations

import logging

import numpy as np
import pytest
import torch

import transformerslocal as tl
from cellfm_factories import PRETRAINING_SHAPES, RELEASE_80M, SCALARS, TINY_RELEASE, encoder_shapes, \
    released_tensors
from transformerslocal.convert_cellfm import (
    CheckpointFormatError,
    _encode_varint,
    _field,
    cellfm_state_dict,
    config_from_cellfm_state,
    convert_cellfm_checkpoint,
    list_mindspore_checkpoint,
    read_mindspore_checkpoint,
    write_mindspore_checkpoint,
)


def _tensors():
    rng = np.random.default_rng(0)
    return {"w": rng.standard_normal((5, 3)).astype(np.float32), "h": rng.standard_normal(7).astype(np.float16),
            "i": np.arange(6, dtype=np.int32).reshape(2, 3), "s": np.array(3, dtype=np.int64)}


@pytest.mark.parametrize("options", [{}, {"piece_bytes": 8}, {"packed_dims": True}, {"crc_trailer": True},
                                     {"piece_bytes": 12, "packed_dims": True, "crc_trailer": True}])
def test_written_checkpoints_read_back_exactly(tmp_path, options):
    tensors = _tensors()
    file = write_mindspore_checkpoint(tmp_path / "a.ckpt", tensors, **options)
    back = read_mindspore_checkpoint(file)
    assert list(back) == list(tensors)
    for key, value in tensors.items():
        assert back[key].dtype == value.dtype and back[key].shape == value.shape
        assert np.array_equal(back[key], value)


def test_pieces_are_concatenated_in_order(tmp_path):
    tensors = {"w": np.arange(20, dtype=np.float32).reshape(5, 4)}
    write_mindspore_checkpoint(tmp_path / "a.ckpt", tensors, piece_bytes=12)  # 7 pieces of 3 values or fewer
    data = (tmp_path / "a.ckpt").read_bytes()
    assert data.count(b"\x0a\x01w") == 7
    assert np.array_equal(read_mindspore_checkpoint(tmp_path / "a.ckpt")["w"], tensors["w"])


def test_pieces_with_their_own_rows_are_stacked(tmp_path):
    # each piece carrying the dims of its own rows (rows 0-1, then row 2)
    full = np.arange(12, dtype=np.float32).reshape(3, 4)
    data = b""
    for rows in (full[:2], full[2:]):
        dims = b"".join(_encode_varint(1 << 3) + _encode_varint(d) for d in rows.shape)
        proto = dims + _field(2, b"Float32") + _field(3, rows.tobytes())
        data += _field(1, _field(1, b"w") + _field(2, proto))
    (tmp_path / "a.ckpt").write_bytes(data)
    assert np.array_equal(read_mindspore_checkpoint(tmp_path / "a.ckpt")["w"], full)


@pytest.mark.parametrize("content", [b"", b"hello, I am a text file\n" * 3, bytes(range(256)) * 4,
                                     b"PK\x03\x04" + b"\x00" * 60])
def test_a_file_that_is_not_a_checkpoint_is_refused_by_name(tmp_path, content):
    file = tmp_path / "notes.ckpt"
    file.write_bytes(content)
    with pytest.raises(CheckpointFormatError, match="notes.ckpt"):
        read_mindspore_checkpoint(file)


def test_a_truncated_checkpoint_is_refused(tmp_path):
    file = write_mindspore_checkpoint(tmp_path / "a.ckpt", _tensors())
    file.write_bytes(file.read_bytes()[:-5])
    with pytest.raises(CheckpointFormatError, match="a.ckpt"):
        read_mindspore_checkpoint(file)


def test_released_key_set_converts_with_every_key_mapped_and_drops_reported(tmp_path, caplog):
    tensors = released_tensors()
    write_mindspore_checkpoint(tmp_path / "release.ckpt", tensors, piece_bytes=4096)
    with caplog.at_level(logging.INFO, logger="transformerslocal.convert_cellfm"):
        report = convert_cellfm_checkpoint(tmp_path / "release.ckpt", tmp_path / "out")
    encoder = encoder_shapes(**TINY_RELEASE)
    expected = {k: k.replace(".gamma", ".weight").replace(".beta", ".bias") for k in encoder}
    assert report.kept == expected
    moments = sorted(k for k in tensors if k.startswith(("moment1.", "moment2.")))
    assert sorted(report.dropped["optimizer moments"]) == moments
    assert sorted(report.dropped["pretraining only"]) == sorted(PRETRAINING_SHAPES)
    assert sorted(report.dropped["training scalars"]) == sorted(SCALARS)
    assert set(report.dropped) == {"optimizer moments", "pretraining only", "training scalars"}  # nothing unknown
    assert "dropped 4 (training scalars)" in caplog.text and "dropped 6 (pretraining only)" in caplog.text
    model = tl.CellFMModel.from_pretrained(tmp_path / "out")
    config = model.config
    assert (config.vocab_size, config.hidden_size, config.num_hidden_layers, config.num_attention_heads,
            config.intermediate_size, config.value_slots) == (24, 64, 2, 2, 64, 8)
    state = model.state_dict()
    assert set(state) == set(expected.values())
    for tag, key in expected.items():
        assert np.array_equal(state[key].numpy(), tensors[tag])


def test_sizes_of_the_80m_release_are_read_from_its_shapes():
    state = {k.replace(".gamma", ".weight").replace(".beta", ".bias"): torch.empty(s, device="meta")
             for k, s in encoder_shapes(**RELEASE_80M).items()}
    config = config_from_cellfm_state(state)
    assert (config.vocab_size, config.hidden_size, config.num_hidden_layers, config.num_attention_heads,
            config.head_dim, config.value_slots) == (27856, 1536, 2, 48, 32, 256)
    assert config_from_cellfm_state(state, num_attention_heads=24).head_dim == 64


def test_an_unknown_entry_is_refused_unless_dropped_on_request():
    tensors = released_tensors(moments=False)
    tensors["mystery.weight"] = np.ones((3, 3), np.float32)
    with pytest.raises(CheckpointFormatError, match="mystery.weight"):
        cellfm_state_dict(tensors, source="x.ckpt")
    state, report = cellfm_state_dict(tensors, source="x.ckpt", drop_unknown=True)
    assert report.dropped["unknown"] == ["mystery.weight"] and "mystery.weight" not in state


def test_a_checkpoint_without_the_encoder_is_refused(tmp_path):
    file = write_mindspore_checkpoint(tmp_path / "other.ckpt", {"global_step": np.array([3], np.int32)})
    with pytest.raises(CheckpointFormatError, match=r"other.ckpt: no \['gene_emb'"):
        convert_cellfm_checkpoint(file, tmp_path / "out")


def test_a_training_wrapper_prefix_is_removed():
    tensors = {f"network.backbone.{k}": v for k, v in released_tensors(moments=False, scalars=False).items()}
    state, report = cellfm_state_dict(tensors)
    assert "gene_emb" in state and "encoder.1.post_norm2.bias" in state
    assert report.kept["network.backbone.encoder.0.post_norm1.gamma"] == "encoder.0.post_norm1.weight"


def test_listing_and_selecting_read_only_what_is_asked(tmp_path):
    tensors = _tensors()
    file = write_mindspore_checkpoint(tmp_path / "a.ckpt", tensors, piece_bytes=8)
    assert list_mindspore_checkpoint(file) == {"w": 15, "h": 7, "i": 6, "s": 1}
    picked = read_mindspore_checkpoint(file, select=lambda tag: tag in ("h", "s"))
    assert list(picked) == ["h", "s"] and np.array_equal(picked["h"], tensors["h"])


def test_dropped_entries_are_never_decoded(tmp_path, monkeypatch):
    import transformerslocal.convert_cellfm as cc

    decoded = []
    assemble = cc._assemble
    monkeypatch.setattr(cc, "_assemble", lambda pieces, buf, path: decoded.append(pieces[0].tag)
                        or assemble(pieces, buf, path))
    write_mindspore_checkpoint(tmp_path / "release.ckpt", released_tensors())
    report = convert_cellfm_checkpoint(tmp_path / "release.ckpt", tmp_path / "out")
    assert sorted(decoded) == sorted(report.kept)
