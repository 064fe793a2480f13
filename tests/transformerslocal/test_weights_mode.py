"""Weights are written readable as any other output under the user's umask (safetensors alone
creates its file 0600, which hid pretrained checkpoints from the rest of a lab)."""
from __future__ import annotations

import os
import stat

import pytest
import torch

from transformerslocal import BertConfig, BertForMaskedLM


@pytest.mark.parametrize("safe", [True, False])
def test_saved_weights_follow_the_umask(tmp_path, safe):
    old = os.umask(0o022)
    try:
        torch.manual_seed(0)
        model = BertForMaskedLM(BertConfig(vocab_size=20, hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
                                           intermediate_size=9, max_position_embeddings=16))
        model.save_pretrained(tmp_path, safe_serialization=safe)
    finally:
        os.umask(old)
    weights = tmp_path / ("model.safetensors" if safe else "pytorch_model.bin")
    assert stat.S_IMODE(weights.stat().st_mode) == 0o644
