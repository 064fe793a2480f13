"""Frozen-prefix activation caching: epoch 1 vs later epochs (FoldTrainer + FrozenPrefixCache).

Two settings where the embeddings and the first half of the layers are frozen and
unprompted:

- ``full FT, freeze_layers = n/2``: the upper half trains fully (weights and inputs get
  gradients);
- ``encoder adapters, upper half``: ``encoder_prompt`` with ``space_adapter_conf`` /
  ``mlp_adapter_conf`` = 0 in the lower half, 1 in the upper half (adapters only later).

Each runs with the cache on and, for reference, off. Epoch time is reported two ways:
the training loop alone (``FitResult.history[i]["epoch_seconds"]``) and training plus
that epoch's validation pass (validation also reads the cache). Cells: the synthetic
length distribution of ``common.make_dataset`` (random gene tokens), sampler ``length``
(every cell once per epoch) and ``balanced`` (the default: class-balanced draws *with
replacement*, so a cell drawn first in epoch 2 is still missing from the cache).

Upper bound: with L layers, k = L/2 frozen, a layer forward costing 1 and its backward 2
(1 for input gradients, 1 for weight gradients): full FT epoch 1 costs k + 3(L-k), later
3(L-k): at most (k + 3(L-k)) / 3(L-k) = 1.33x at k = L/2; with adapters only (frozen
weights, input gradients only) k + 2(L-k) vs 2(L-k): 1.5x. Validation passes gain up to
L/(L-k) = 2x.

    python benchmarks/bench_frozen_cache.py --json out.json [--quick] [--device cpu|cuda]
"""
from __future__ import annotations

import logging
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from common import V1_BASE, SHAPES, base_parser, machine_info, make_dataset, resolve, write_json


def make_cells(lengths: np.ndarray, labels: np.ndarray, vocab: int, seed: int, name: str):
    from geneformer_peft.data.cells import EncodedCells

    rng = np.random.default_rng(seed)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    flat = rng.integers(1, vocab, size=int(offsets[-1])).astype(np.int32)
    return EncodedCells(flat, offsets, labels=labels.astype(np.int64), name=name)


def run(setting: str, arch: dict, train, val, *, cache_on: bool, sampler: str, epochs: int, batch_size: int,
        device: torch.device, frozen: int | None = None) -> dict:
    from geneformer_peft.training.frozen_cache import FrozenPrefixCache
    from geneformer_peft.training.trainer import FoldTrainer, set_seed
    from geneformer_peft.training.arguments import TrainingArguments
    from transformerslocal import BertConfig, BertForSequenceClassification, mark_trainable

    n = arch["num_hidden_layers"]
    k = n // 2 if frozen is None else frozen
    if setting.startswith("full_ft"):
        peft = dict(prompt_type="", freeze_layers=k)
    else:
        peft = dict(prompt_type="encoder_prompt", space_adapter_conf=[0] * k + [1] * (n - k),
                    mlp_adapter_conf=[0] * k + [1] * (n - k))
    set_seed(0)
    model = BertForSequenceClassification(BertConfig(**arch, num_labels=int(train.labels.max()) + 1, **peft))
    mark_trainable(model)
    model.to(device)
    cache = FrozenPrefixCache.for_model(model, timed=True) if cache_on else None
    assert not cache_on or cache.depth == k, (cache and cache.depth, k)
    args = TrainingArguments(epochs=epochs, batch_size=batch_size, lr=1e-4, early_stopping_patience=0, sampler=sampler,
                             class_weighting="none", progress=False, device=device.type)
    trainer = FoldTrainer(model, train, val, args, class_weights=None, device=device, encoder_cache=cache)
    val_seconds, prefix_before_val, prefix_after_val = [], [], []
    original = trainer.evaluate

    def timed_evaluate(cells, desc="validate"):
        prefix_before_val.append(cache.compute_seconds if cache is not None else 0.0)
        t0 = time.perf_counter()
        out = original(cells, desc)
        val_seconds.append(time.perf_counter() - t0)
        prefix_after_val.append(cache.compute_seconds if cache is not None else 0.0)
        return out

    trainer.evaluate = timed_evaluate
    fit = trainer.fit()
    train_s = [h["epoch_seconds"] for h in fit.history]
    total_s = [a + b for a, b in zip(train_s, val_seconds)]
    out = {"setting": setting, "cache": cache_on, "sampler": sampler, "frozen_layers": k, "layers": n,
           "train_epoch_seconds": train_s, "validation_seconds": val_seconds, "epoch_seconds_with_validation": total_s}
    if cache is not None:
        out.update(cache_hits=cache.hits, cache_misses=cache.misses, cache_mib=cache.used_bytes / 2 ** 20)
        # seconds spent computing prefix rows inside each epoch's training loop
        starts = [0.0] + prefix_after_val[:-1]
        out["train_prefix_seconds"] = [b - a for a, b in zip(starts, prefix_before_val)]
        out["train_prefix_share_epoch1"] = out["train_prefix_seconds"][0] / train_s[0]
    if len(train_s) > 1:
        out["later_vs_first_train"] = train_s[0] / float(np.mean(train_s[1:]))
        out["later_vs_first_with_validation"] = total_s[0] / float(np.mean(total_s[1:]))
    print(f"{setting} cache={cache_on} sampler={sampler}: train {['%.2f' % s for s in train_s]} s, "
          f"+val {['%.2f' % s for s in total_s]} s", flush=True)
    return out


def main(argv=None) -> int:
    p = base_parser(__doc__)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    device = resolve(args.device)
    cpu_quick = args.quick and device.type == "cpu"
    work = Path(args.workdir or tempfile.mkdtemp(prefix="gf_bench_"))
    meta = make_dataset(work, n_cells=400 if cpu_quick else 2000, model_input_size=1024, median_library_size=1500.0)
    lengths = np.asarray(meta["all_lengths"])
    labels = np.unique(np.asarray(meta["labels"]), return_inverse=True)[1]
    if cpu_quick:
        arch = dict(V1_BASE, hidden_size=128, num_hidden_layers=4, num_attention_heads=4, intermediate_size=256)
        n_train, n_val, epochs, bs = 96, 32, 3, 16
    else:
        arch = SHAPES["6L-256"]
        n_train, n_val, epochs, bs = 1600, 200, 4, 32
    train = make_cells(lengths[:n_train], labels[:n_train], arch["vocab_size"], 1, "train")
    val = make_cells(lengths[n_train:n_train + n_val], labels[n_train:n_train + n_val], arch["vocab_size"], 2, "val")
    runs = []
    n_layers = arch["num_hidden_layers"]
    for setting in ("full_ft_freeze_half", "adapters_upper_half"):
        runs.append(run(setting, arch, train, val, cache_on=True, sampler="length", epochs=epochs, batch_size=bs,
                        device=device))
        runs.append(run(setting, arch, train, val, cache_on=False, sampler="length", epochs=2, batch_size=bs,
                        device=device))
    runs.append(run("adapters_upper_half", arch, train, val, cache_on=True, sampler="balanced", epochs=epochs,
                    batch_size=bs, device=device))
    # beyond the target's setting: three quarters of the layers frozen
    for setting in ("full_ft_freeze_3_4", "adapters_upper_quarter"):
        runs.append(run(setting, arch, train, val, cache_on=True, sampler="length", epochs=epochs, batch_size=bs,
                        device=device, frozen=3 * n_layers // 4))
    write_json(args.json, {"bench": "frozen_cache", "machine": machine_info(device), "n_train": n_train, "n_val": n_val,
                           "batch_size": bs, "model": {k: arch[k] for k in ("hidden_size", "num_hidden_layers",
                                                                            "num_attention_heads", "intermediate_size")},
                           "runs": runs})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
