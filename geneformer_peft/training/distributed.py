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

__all__ = ["barrier", "init_distributed", "is_distributed", "is_main_process", "launched_by_torchrun", "local_device", "rank", "world_size"]


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
