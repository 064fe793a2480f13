"""Training stage: settings, the fine-tuning loop of a fold, optimiser and schedule, the
K-fold cross-validation runner, masked-gene pretraining, the frozen-prefix cache and
data-parallel helpers.

Names are loaded on first use (``from geneformer_peft.training import X`` imports only the
module holding ``X``).
"""
from __future__ import annotations

import importlib
from typing import Any

#: public name -> module of this package that defines it
_WHERE: dict[str, str] = {
    "CLASS_WEIGHTINGS": "arguments",
    "LR_SCHEDULES": "arguments",
    "PRECISIONS": "arguments",
    "SAMPLERS": "arguments",
    "TrainingArguments": "arguments",
    "RunOptions": "cross_validation",
    "library_versions": "cross_validation",
    "run_cross_validation": "cross_validation",
    "run_directory": "cross_validation",
    "train_fold": "cross_validation",
    "barrier": "distributed",
    "init_distributed": "distributed",
    "is_distributed": "distributed",
    "is_main_process": "distributed",
    "launched_by_torchrun": "distributed",
    "local_device": "distributed",
    "rank": "distributed",
    "world_size": "distributed",
    "FrozenPrefixCache": "frozen_cache",
    "frozen_prefix_depth": "frozen_cache",
    "PretrainResult": "pretrain",
    "frequency_baseline_loss": "pretrain",
    "pretrain": "pretrain",
    "make_optimizer": "schedules",
    "make_scheduler": "schedules",
    "BestModel": "trainer",
    "FitResult": "trainer",
    "FoldTrainer": "trainer",
    "make_sampler": "trainer",
    "set_seed": "trainer",
}

__all__ = sorted(_WHERE)


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_WHERE[name]}"), name)


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
