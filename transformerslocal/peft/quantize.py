"""A quantized frozen base under the PEFT methods (QLoRA's recipe): :func:`quantize_base`.

The frozen projections of the encoder (every ``nn.Linear`` whose weight does not train under
the model's PEFT methods: the six projections of each layer, minus those a method trains) keep
their ``weight`` attribute, now a tensor subclass of ``torchao`` (the ``quant`` extra):

- ``nf4``: 4-bit NormalFloat (the 16 quantiles of N(0, 1) scaled to [-1, 1]), two codes a
  byte, one absmax scale per block of 64 weights, the scales double-quantised (mean taken
  out, int8 in blocks of 256 with one float32 factor each), as QLoRA (Dettmers et al. 2023):
  about 0.52 bytes a weight instead of 4;
- ``int8``: symmetric int8 with one float32 scale per output row: about 1 byte a weight.

The methods' layers need no change: ``F.linear`` on such a weight dequantizes it to the
input's dtype (under bf16 autocast, the run's precision) and, for nf4, again in backward
rather than keeping the dense copy alive. Where a method needs the weight itself (DoRA's
norm, merging) it asks :func:`dense_weight`. The model's state dict holds the dequantized
weights (what the model computes with), so ``save_pretrained``, merging and a reference
model built from that state dict see a plain BERT; the PEFT weights are the trainable part
as always and load onto the unquantized base.
"""
from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

logger = logging.getLogger(__name__)

__all__ = ["NF4_BLOCK_SIZE", "NF4_SCALER_BLOCK_SIZE", "QUANTIZE_SCHEMES", "QuantizeReport", "check_quantizable",
           "dense_weight", "is_quantized", "quantize_base", "quantized_nbytes", "require_torchao"]

#: the ``--quantize`` choices
QUANTIZE_SCHEMES = ("nf4", "int8")
#: weights per absmax scale (QLoRA)
NF4_BLOCK_SIZE = 64
#: scales per double-quantisation block (QLoRA); smaller where a weight has fewer blocks
NF4_SCALER_BLOCK_SIZE = 256
EXTRA_HINT = "pip install 'geneformer-peft[quant]' (or: pip install torchao)"

#: quantized weight class -> its dequantization, filled when torchao is first imported
_DEQUANTIZE: dict[type, Callable[[torch.Tensor], torch.Tensor]] = {}
_QUANTIZE: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {}


def require_torchao() -> None:
    """Import torchao's quantized weight classes once.

    Raises
    ------
    ImportError
        If torchao is not installed, naming the extra that brings it.
    """
    if _QUANTIZE:
        return
    # torchao's import warns once per CUDA kernel library a CPU-only torch cannot load, and
    # torch about a deprecated registration torchao makes: noise for this use, kept quiet
    quiet = [logging.getLogger(name) for name in ("torchao", "torch.utils._pytree")]
    levels = [log.level for log in quiet]
    for log in quiet:
        log.setLevel(logging.ERROR)
    try:
        from torchao.quantization.granularity import PerRow
        from torchao.quantization.quantize_.workflows.int8.int8_tensor import Int8Tensor
        from torchao.quantization.quantize_.workflows.nf4.nf4_tensor import NF4Tensor
    except ImportError as err:
        raise ImportError(f"--quantize needs torchao, which is not installed ({err}); {EXTRA_HINT}") from err
    finally:
        for log, level in zip(quiet, levels):
            log.setLevel(level)

    def nf4(weight: torch.Tensor) -> torch.Tensor:
        return NF4Tensor.from_tensor(weight, NF4_BLOCK_SIZE, _scaler_block_size(weight.numel() // NF4_BLOCK_SIZE))

    _DEQUANTIZE[NF4Tensor] = lambda w: w.get_original_weight()
    _DEQUANTIZE[Int8Tensor] = lambda w: w.dequantize()
    _QUANTIZE.update(nf4=nf4, int8=lambda w: Int8Tensor.from_hp(w, PerRow()))


def _scaler_block_size(n_blocks: int) -> int:
    """QLoRA's 256 scales per block, or the largest divisor of ``n_blocks`` below it (small layers)."""
    return max(d for d in range(1, min(NF4_SCALER_BLOCK_SIZE, n_blocks) + 1) if n_blocks % d == 0)


def is_quantized(weight: Any) -> bool:
    """Whether ``weight`` is a quantized base weight made by :func:`quantize_base`."""
    return isinstance(weight, tuple(_DEQUANTIZE))


def dense_weight(weight: torch.Tensor) -> torch.Tensor:
    """``weight`` as a plain tensor: a quantized one dequantized (in its original dtype), a
    plain one as it is."""
    for cls, dequantize in _DEQUANTIZE.items():
        if isinstance(weight, cls):
            return dequantize(weight)
    return weight


def check_quantizable(config: Any, scheme: str | None, source: str | None = None) -> None:
    """Refuse ``scheme`` for a model ``config`` it cannot apply to, before anything is built.

    Parameters
    ----------
    config
        The run's model config.
    scheme
        One of :data:`QUANTIZE_SCHEMES`, or ``None`` (nothing to check).
    source
        Where the config came from, for the message.

    Raises
    ------
    ValueError
        For an unknown scheme, a config without PEFT methods (full fine-tuning trains the
        weights quantization would freeze), or LoRA with ``lora_merge_weights`` on (the update
        cannot be added into a quantized weight).
    """
    if scheme is None:
        return
    where = f" ({source})" if source else ""
    if scheme not in QUANTIZE_SCHEMES:
        raise ValueError(f"--quantize {scheme!r}: expected one of {list(QUANTIZE_SCHEMES)}")
    if not config.peft_methods:
        raise ValueError(f"--quantize {scheme} needs a PEFT method (prompt_type is empty{where}): full fine-tuning "
                         "trains the encoder weights that quantization freezes; pick e.g. --prompt_type lora")
    if config.uses("lora") and getattr(config, "lora_merge_weights", False):
        raise ValueError(f"--quantize {scheme} with lora_merge_weights true{where}: the LoRA update cannot be merged "
                         "into a quantized weight; set lora_merge_weights false")


@dataclass(frozen=True)
class QuantizeReport:
    """What :func:`quantize_base` did: the scheme, the layers and their weight bytes."""

    scheme: str
    layers: int
    dense_bytes: int
    quantized_bytes: int

    def __str__(self) -> str:
        return (f"--quantize {self.scheme}: {self.layers} frozen projections, weights "
                f"{self.dense_bytes / 2**20:.1f} MiB -> {self.quantized_bytes / 2**20:.1f} MiB")

    def to_dict(self) -> dict:
        return {"quantize": self.scheme, "quantized_layers": self.layers,
                "quantized_weight_bytes": self.quantized_bytes, "dense_weight_bytes": self.dense_bytes}


def quantized_nbytes(weight: torch.Tensor) -> int:
    """Bytes a weight holds: a plain tensor's elements, or the sum over a quantized one's inner
    tensors (codes, scales, factors).

    Parameters
    ----------
    weight
        A parameter or buffer.
    """
    if not is_quantized(weight):
        return weight.numel() * weight.element_size()
    names, _ = weight.__tensor_flatten__()
    return sum(getattr(weight, n).numel() * getattr(weight, n).element_size() for n in names
               if getattr(weight, n) is not None)


def _dense_state(module: nn.Module, state: dict, prefix: str, local_metadata: Any) -> None:
    key = prefix + "weight"
    if key in state and is_quantized(state[key]):
        state[key] = dense_weight(state[key].detach())


def quantize_base(model: nn.Module, scheme: str, device: torch.device | str | None = None) -> QuantizeReport:
    """Store the frozen projection weights of ``model`` quantized, in place.

    Call it after the base weights are loaded and ``mark_trainable`` has run (the weights that
    do not train are the ones quantized), before training; a weight already quantized stays
    as it is. A DoRA layer still at its start (``B = 0``) has its magnitude restarted at the norm
    of its quantized weight, so the model starts equal to the quantized base.

    Parameters
    ----------
    model
        A model whose config lists PEFT methods (``prompt_type``).
    scheme
        ``"nf4"`` or ``"int8"`` (:data:`QUANTIZE_SCHEMES`).
    device
        Where to quantize and keep the quantized weights (the run's device: on a GPU much faster
        than on the CPU, and the dense weights go there one at a time); default: where they are.

    Raises
    ------
    ValueError
        If :func:`check_quantizable` refuses, or (nf4) a projection has a number of weights
        that is not a multiple of 64.
    ImportError
        If torchao is not installed.
    """
    check_quantizable(model.config, scheme)
    require_torchao()
    quantize = _QUANTIZE[scheme]
    targets = [(name, module) for name, module in model.named_modules()
               if isinstance(module, nn.Linear) and not module.weight.requires_grad
               and not is_quantized(module.weight)]
    if scheme == "nf4":
        odd = [(n, tuple(m.weight.shape)) for n, m in targets if m.weight.numel() % NF4_BLOCK_SIZE]
        if odd:
            raise ValueError(f"--quantize nf4 stores weights in blocks of {NF4_BLOCK_SIZE}; these projections have "
                             f"a number of weights that is not a multiple of {NF4_BLOCK_SIZE}: {odd[:5]}")
    dense_bytes = quantized_bytes = 0
    with torch.no_grad():
        for _, module in targets:
            weight = module.weight.detach()
            weight = weight if device is None else weight.to(device)
            dense_bytes += weight.numel() * weight.element_size()
            module.weight = nn.Parameter(quantize(weight.contiguous()), requires_grad=False)
            quantized_bytes += quantized_nbytes(module.weight)
            module.register_state_dict_post_hook(_dense_state)
            if hasattr(module, "restart_magnitude"):
                module.restart_magnitude()
    report = QuantizeReport(scheme, len(targets), dense_bytes, quantized_bytes)
    logger.info("%s", report)
    return report
