"""Dropout whose random mask is cheaper to draw on CPU.

On CPU, ``F.dropout`` fills a Bernoulli tensor element by element from the Mersenne-Twister
generator; in a Geneformer training step on CPU that is about a quarter of the time (the
attention-probability masks alone are B x h x L x L). A keep/drop decision only needs one
uniform 32-bit integer per element: drawing 64-bit integers over their full range and
reading each as two 32-bit fields takes about half the time of ``bernoulli_`` (4M elements:
6 ms vs 13 ms on the development CPU), and dropout forward + backward is 1.2-1.6x faster
(``docs/benchmarks.md``, section 1). An element is dropped when its field is below ``p * 2**32``, so the
drop probability is ``round(p * 2**32) / 2**32`` (off by < 1.2e-10), kept elements are scaled
by ``1 / (1 - p)`` as in ``nn.Dropout``, and the draws come from torch's default CPU
generator, so ``torch.manual_seed`` and checkpoint recomputation (which restores the RNG
state) reproduce the same masks. The mask itself differs from ``F.dropout``'s for the same
seed (another use of the random stream).

Off CPU (CUDA), ``F.dropout``'s fused kernel is already fast and is used unchanged.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

_INT32_MIN = -(2 ** 31)
_INT64_MIN, _INT64_END = -(2 ** 63), 2 ** 63 - 1


def keep_mask(shape: torch.Size | tuple[int, ...], p: float) -> torch.Tensor:
    """Boolean CPU tensor of ``shape``: True with probability 1 - p, independently."""
    n = 1
    for s in shape:
        n *= s
    # random_(from, to) draws uniformly from [from, to): all 64-bit patterns but one
    bits = torch.empty((n + 1) // 2, dtype=torch.int64).random_(_INT64_MIN, _INT64_END)
    fields = bits.view(torch.int32)[:n]  # uniform over [-2**31, 2**31)
    threshold = _INT32_MIN + round(p * 2 ** 32)
    return fields.ge(threshold).view(shape)


class _ScaleByMask(torch.autograd.Function):
    """y = x * keep * scale; saves only the boolean mask (1 byte per element) for backward."""

    @staticmethod
    def forward(ctx, x, keep, scale):
        ctx.save_for_backward(keep)
        ctx.scale = scale
        return x.mul(_as_factor(keep, x.dtype)).mul_(scale)

    @staticmethod
    def backward(ctx, grad):
        (keep,) = ctx.saved_tensors
        return grad.mul(_as_factor(keep, grad.dtype)).mul_(ctx.scale), None, None


def _as_factor(keep: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    # bool -> float goes through a slow generic cast on CPU; its bytes read as uint8 (0/1)
    # convert ~6x faster, and multiplying by a float factor beats where()/masked_fill
    return keep.view(torch.uint8).to(dtype)


def dropout(x: torch.Tensor, p: float, training: bool = True) -> torch.Tensor:
    """Functional dropout: the cheap CPU mask on CPU, ``F.dropout`` elsewhere."""
    if not training or p == 0.0:
        return x
    if x.device.type != "cpu" or p >= 1.0:
        return F.dropout(x, p, training)
    return _ScaleByMask.apply(x, keep_mask(x.shape, p), 1.0 / (1.0 - p))


class Dropout(nn.Module):
    """Drop-in for ``nn.Dropout`` (same ``p``, no parameters, no state-dict entries)."""

    def __init__(self, p: float = 0.5) -> None:
        super().__init__()
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"dropout probability has to be between 0 and 1, got {p}")
        self.p = float(p)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return dropout(x, self.p, self.training)

    def extra_repr(self) -> str:
        return f"p={self.p}"
