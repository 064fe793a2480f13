"""A quantized frozen base under the PEFT methods (``transformerslocal.peft.quantize``).

The dequantized weights are decoded here from the stored codes and scales, independently of
torchao's decoder: NF4 with double quantisation as QLoRA (code book of the paper, blocks of 64
weights, the block scales as int8 in blocks of 256 with one float32 factor and a mean), int8 as
one scale per output row. The quantized model must compute what a plain model with those
weights computes (logits and PEFT gradients, 1e-5).
"""
from __future__ import annotations

import sys

import pytest
import torch

from peft_cases import batch, perturb_peft, tiny_config
from transformerslocal import BertForSequenceClassification, load_peft_model, mark_trainable, save_peft_weights
from transformerslocal.peft import quantize as q

# QLoRA's NF4 code book (Dettmers et al. 2023, appendix E)
QLORA_NF4 = [-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
             -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
             0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
             0.7229568362236023, 1.0]
#: hidden 128: a 128 x 128 projection has 256 blocks of 64, one full double-quantisation block
SIZES = dict(hidden_size=128, intermediate_size=192, num_attention_heads=4)
METHODS = ["lora", "dora", "ia3", "encoder_prompt", "Gene_token_prompt", "prefix_prompt"]


def _torchao():
    pytest.importorskip("torchao", reason="the 'quant' extra (torchao) is not installed")


def decode_nf4(w) -> torch.Tensor:
    """The weight an NF4 tensor stands for, from its bytes and scales."""
    codes = torch.stack([w.quantized_data >> 4, w.quantized_data & 0xF], dim=1).flatten().long()
    n_scaler_blocks = w.quantization_factor.numel()
    scalers = w.quantized_scalers.float().view(n_scaler_blocks, -1) / w.quantization_factor[:, None]
    scales = (scalers.flatten() + w.scaler_mean).repeat_interleave(q.NF4_BLOCK_SIZE)
    return (w.nf4[codes] * scales).view(w.shape)


def decode_int8(w) -> torch.Tensor:
    return w.qdata.float() * w.scale.view(-1, 1).float()


def decoded_state(model) -> dict[str, torch.Tensor]:
    """The model's weights with every quantized one decoded here (not through its state dict)."""
    state = {}
    for name, module in model.named_modules():
        for key, tensor in list(module._parameters.items()) + list(module._buffers.items()):
            if tensor is None or (key in module._non_persistent_buffers_set):
                continue
            if q.is_quantized(tensor):
                tensor = decode_nf4(tensor) if hasattr(tensor, "quantized_data") else decode_int8(tensor)
            state[f"{name}.{key}" if name else key] = tensor.detach()
    return state


def quantized_model(prompt_type: str, scheme: str, seed: int = 0, **overrides):
    torch.manual_seed(seed)
    model = BertForSequenceClassification(tiny_config(**{**SIZES, "prompt_type": prompt_type, **overrides})).train()
    mark_trainable(model)
    perturb_peft(model)  # as if trained: LoRA B and the adapters' last layer start at zero
    q.quantize_base(model, scheme)
    return model


def peft_grads(model, ids, mask, labels) -> dict[str, torch.Tensor]:
    model.zero_grad()
    model(ids, attention_mask=mask, labels=labels).loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("scheme", q.QUANTIZE_SCHEMES)
@pytest.mark.parametrize("prompt_type", METHODS)
def test_quantized_model_equals_a_plain_model_with_the_dequantized_weights(prompt_type, scheme):
    _torchao()
    model = quantized_model(prompt_type, scheme)
    reference = BertForSequenceClassification(model.config).train()
    reference.load_state_dict(decoded_state(model))
    mark_trainable(reference)
    ids, mask, labels = batch(lengths=(9, 5, 7), vocab=99)
    model.eval(), reference.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(ids, attention_mask=mask).logits,
                                   reference(ids, attention_mask=mask).logits, atol=1e-5, rtol=0)
    model.train(), reference.train()
    got, want = peft_grads(model, ids, mask, labels), peft_grads(reference, ids, mask, labels)
    assert got.keys() == want.keys() and got
    for name in got:
        torch.testing.assert_close(got[name], want[name], atol=1e-5, rtol=1e-4, msg=name)


@pytest.mark.parametrize("scheme", q.QUANTIZE_SCHEMES)
def test_state_dict_holds_the_dequantized_weights(scheme):
    _torchao()
    model = quantized_model("lora", scheme)
    state, decoded = model.state_dict(), decoded_state(model)
    key = "bert.encoder.layer.0.attention.self.query.weight"
    assert not q.is_quantized(state[key]) and type(state[key]) is torch.Tensor
    for name, value in decoded.items():
        torch.testing.assert_close(state[name], value, atol=1e-6, rtol=0, msg=name)


def test_nf4_storage_is_qlora_nf4_with_double_quantisation():
    _torchao()
    model = quantized_model("lora", "nf4")
    query = model.bert.encoder.layer[0].attention.self.query
    w = query.weight
    assert q.is_quantized(w) and not w.requires_grad and tuple(w.shape) == (128, 128)
    torch.testing.assert_close(w.nf4.float(), torch.tensor(QLORA_NF4), atol=1e-4, rtol=0)
    n = 128 * 128
    assert w.quantized_data.dtype == torch.uint8 and w.quantized_data.numel() == n // 2  # two codes a byte
    assert w.quantized_scalers.dtype == torch.int8 and w.quantized_scalers.numel() == n // 64
    assert w.quantization_factor.numel() == n // 64 // 256  # one factor per 256 scales
    # every weight is its block's scale times a code, so decoding is close to the original
    original = torch.randn(128, 128, generator=torch.Generator().manual_seed(3)) * 0.05
    encoded = q._QUANTIZE["nf4"](original)
    error = (decode_nf4(encoded) - original).abs()
    assert error.max() < 0.35 * original.abs().max() and error.mean() < 0.1 * original.abs().mean() + 2e-3
    # the LoRA factors and the head stay plain, trainable float32
    assert query.lora_A.dtype == torch.float32 and query.lora_A.requires_grad
    assert not q.is_quantized(model.classifier.weight) and model.classifier.weight.requires_grad


def test_only_frozen_projections_are_quantized_and_bytes_shrink():
    _torchao()
    torch.manual_seed(0)
    model = BertForSequenceClassification(tiny_config(prompt_type="encoder_prompt", **SIZES))
    mark_trainable(model)
    report = q.quantize_base(model, "nf4")
    layers = model.config.num_hidden_layers
    assert report.layers == 6 * layers
    assert report.dense_bytes / report.quantized_bytes > 7.5  # ~0.52 bytes a weight instead of 4
    quantized = {n.rsplit(".", 1)[0] for n, p in model.named_parameters() if q.is_quantized(p)}
    assert len(quantized) == 6 * layers
    assert all(".encoder.layer." in n and "Adapter" not in n for n in quantized)
    assert all(not q.is_quantized(p) for n, p in model.named_parameters() if p.requires_grad)


def test_dora_starts_equal_to_the_quantized_base():
    """m restarts at ||W_q|| so that g = m / ||W_q + s B A|| is 1 while B = 0."""
    _torchao()
    torch.manual_seed(0)
    model = BertForSequenceClassification(tiny_config(prompt_type="dora", **SIZES))
    mark_trainable(model)
    q.quantize_base(model, "nf4")
    layer = model.bert.encoder.layer[0].attention.self.query
    torch.testing.assert_close(layer.dora_magnitude.detach(), q.dense_weight(layer.weight).norm(dim=1))


def test_bf16_autocast_trains_on_the_quantized_base():
    _torchao()
    model = quantized_model("lora", "nf4")
    ids, mask, labels = batch(lengths=(9, 5, 7), vocab=99)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(ids, attention_mask=mask, labels=labels)
    assert out.logits.dtype == torch.bfloat16
    out.loss.backward()
    grad = model.bert.encoder.layer[0].attention.self.query.lora_A.grad
    assert grad is not None and grad.abs().sum() > 0  # flows back through a quantized layer above


def test_peft_weights_of_a_quantized_model_load_onto_the_unquantized_base(tmp_path):
    _torchao()
    torch.manual_seed(0)
    base = BertForSequenceClassification(tiny_config(**SIZES)).eval()
    base.save_pretrained(tmp_path / "base")
    model = BertForSequenceClassification.from_pretrained(tmp_path / "base", prompt_type="lora").train()
    mark_trainable(model)
    perturb_peft(model)
    q.quantize_base(model, "nf4")
    save_peft_weights(model, tmp_path / "peft")
    loaded = load_peft_model(tmp_path / "base", tmp_path / "peft").eval()
    assert not any(q.is_quantized(p) for p in loaded.parameters())
    for name, param in model.named_parameters():
        if param.requires_grad:
            torch.testing.assert_close(loaded.get_parameter(name), param.detach(), msg=name)
    # the loaded model has the original base weights, not the dequantized ones
    torch.testing.assert_close(loaded.bert.encoder.layer[0].attention.self.query.weight,
                               base.bert.encoder.layer[0].attention.self.query.weight)


def test_refusals_name_the_setting():
    _torchao()
    with pytest.raises(ValueError, match="needs a PEFT method"):
        quantized_model("", "nf4")
    with pytest.raises(ValueError, match="lora_merge_weights"):
        quantized_model("lora", "nf4", lora_merge_weights=True)
    with pytest.raises(ValueError, match=r"multiple of 64.*attention\.self\.key.*\(36, 36\)"):
        quantized_model("lora", "nf4", hidden_size=36, intermediate_size=64)
    with pytest.raises(ValueError, match="expected one of"):
        quantized_model("lora", "nf8")


def test_missing_torchao_names_the_extra(monkeypatch):
    monkeypatch.setattr(q, "_QUANTIZE", {})
    monkeypatch.setitem(sys.modules, "torchao", None)  # import torchao... raises ImportError
    for name in [m for m in sys.modules if m.startswith("torchao.")]:
        monkeypatch.setitem(sys.modules, name, None)
    with pytest.raises(ImportError, match=r"geneformer-peft\[quant\]"):
        q.require_torchao()
