"""Device and precision: resolve ``--device``, autocast for bf16/fp16."""
from __future__ import annotations

import contextlib

import torch

__all__ = ["autocast", "resolve_device"]

def resolve_device(name: str) -> torch.device:
    """``auto`` -> CUDA when present, else CPU; a CUDA device asked for but absent is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as err:
        raise ValueError(f"--device {name!r} is not a device; expected auto, cpu, cuda or cuda:N") from err
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"--device {name!r} asked for CUDA, but no CUDA device is available here "
                             f"(torch {torch.__version__}); use --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"--device {name!r}: only {torch.cuda.device_count()} CUDA device(s) exist")
    return device


def autocast(device: torch.device, precision: str):
    """Autocast context for ``bf16`` / ``fp16``; a no-op for ``fp32``."""
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    if device.type == "cpu" and precision == "fp16":
        raise ValueError("precision fp16 needs CUDA; on CPU use bf16 or fp32")
    return torch.autocast(device_type=device.type, dtype=dtype)
