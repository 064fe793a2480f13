"""Data-parallel training through ``torchrun``: process group, rank helpers.

Launched with ``torchrun --nproc_per_node N example_py/cell_classification_prompt_fold.py ...``
each process trains on a disjoint shard of every epoch's cells (the samplers shard one
shared order), gradients are averaged by DistributedDataParallel, every rank evaluates the
full validation set (so all ranks take the same early-stopping decision), and rank 0
alone writes outputs. NCCL on CUDA, gloo on CPU.
"""
from __future__ import annotations

import logging
import os

import torch
import torch.distributed as dist

logger = logging.getLogger(__name__)

__all__ = ["barrier", "gather_rows", "init_distributed", "shard_of", "is_distributed", "is_main_process", "launched_by_torchrun", "local_device", "rank", "world_size"]


def launched_by_torchrun() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def init_distributed(device: torch.device) -> bool:
    """Join the process group when started by ``torchrun``; return whether distributed."""
    if not launched_by_torchrun():
        return False
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend)
        logger.info("distributed: rank %d of %d (%s)", rank(), world_size(), backend)
    return True


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def is_main_process() -> bool:
    return rank() == 0


def local_device(device: torch.device) -> torch.device:
    """Each rank's own GPU (``LOCAL_RANK``) under torchrun; the device as given otherwise."""
    if device.type == "cuda" and launched_by_torchrun():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return device


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def shard_of(n_items: int) -> range:
    """Indices ``0..n_items-1`` this rank takes: every ``world_size``-th from its rank (all of
    them in one process). The items are batches already formed as one process forms them, so
    that each is computed exactly as it would be without ``torchrun``."""
    return range(rank(), n_items, world_size())


def gather_rows(positions, values, n_rows: int):
    """Rank 0: an ``(n_rows, ...)`` array with each rank's ``values`` at its ``positions``
    (input order); other ranks: ``None``. One process: ``values`` placed at ``positions``.

    ``positions`` of all ranks together must cover ``0..n_rows-1`` once each.
    """
    import numpy as np

    parts = [(positions, values)]
    if is_distributed():
        gathered = [None] * world_size() if is_main_process() else None
        dist.gather_object((positions, values), gathered, dst=0)
        if not is_main_process():
            return None
        parts = gathered
    first = parts[0][1]
    out = np.zeros((n_rows, *first.shape[1:]), dtype=first.dtype)
    seen = np.zeros(n_rows, dtype=np.int64)
    for pos, val in parts:
        out[pos] = val
        seen[pos] += 1
    if not (seen == 1).all():
        raise RuntimeError(f"gather_rows: {int((seen != 1).sum())} of {n_rows} rows were not given exactly once")
    return out
