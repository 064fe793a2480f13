"""Length-aware batching: padding and training throughput of three samplers on realistic
cell lengths.

Lengths: the synthetic labelled cells of ``common.make_dataset`` (rank-value tokens of
cells with about 120-950 detected genes, ``model_input_size`` 1024) and, for comparison,
a log-normal length distribution like Geneformer's corpus (median ~1,100 genes, cut at
2,048).

Samplers (one epoch each, batch size B): ``random`` (plain shuffling; the padding the
reference's ``WeightedRandomSampler`` has too), ``length`` (our LengthGroupedSampler) and
``balanced`` (our BalancedLengthGroupedSampler: class-balanced draws like the reference,
then grouped by length). Padding fraction = padded slots / all slots over the epoch.

Throughput: our model (LoRA, 6L-256 V1 shape on GPU / a 4-layer, hidden-128 model in
``--quick`` CPU mode) trains on an evenly spaced subset of each sampler's batches (same
number of batches each, so the subset's mix of lengths is the epoch's), cells/s = cells /
seconds; the gain is relative to ``random``.

    python benchmarks/bench_batching.py --json out.json [--quick] [--device cpu|cuda]
"""
from __future__ import annotations

import time

import numpy as np
import torch

from common import LORA, V1_BASE, base_parser, build_ours, machine_info, make_dataset, resolve, sync, write_json


def epoch_batches(sampler_name: str, lengths: np.ndarray, labels: np.ndarray, batch_size: int, seed: int = 0):
    from geneformer_peft.data.samplers import BalancedLengthGroupedSampler, LengthGroupedSampler

    if sampler_name == "random":
        order = np.random.default_rng(seed).permutation(len(lengths))
    elif sampler_name == "length":
        order = np.array(list(LengthGroupedSampler(lengths, batch_size, seed=seed)))
    else:
        order = np.array(list(BalancedLengthGroupedSampler(lengths, labels, batch_size, seed=seed)))
    return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]


def padding_fraction(batches, lengths) -> float:
    real = sum(int(lengths[b].sum()) for b in batches)
    slots = sum(int(lengths[b].max()) * len(b) for b in batches)
    return 1.0 - real / slots


def main(argv=None) -> int:
    p = base_parser(__doc__)
    p.add_argument("--batch_size", type=int, default=None)
    args = p.parse_args(argv)
    device = resolve(args.device)
    cpu_quick = args.quick and device.type == "cpu"
    bs = args.batch_size or (8 if cpu_quick else 32)
    work = args.workdir
    import tempfile
    from pathlib import Path

    work = Path(work or tempfile.mkdtemp(prefix="gf_bench_"))
    meta = make_dataset(work, n_cells=400 if cpu_quick else 2000, model_input_size=1024, median_library_size=1500.0)
    synthetic_lengths = np.asarray(meta["all_lengths"])
    labels = np.asarray(meta["labels"])
    rng = np.random.default_rng(0)
    n = 4000
    lognormal = np.clip(np.round(rng.lognormal(np.log(1100), 0.55, size=n)), 50, 2048).astype(np.int64)
    lognormal_labels = rng.choice(5, size=n, p=np.array([1, 1 / 2, 1 / 3, 1 / 4, 1 / 5]) / 2.2833333)
    distributions = {"synthetic cells (model_input_size 1024)": (synthetic_lengths, labels),
                     "log-normal, median 1,100, cut at 2,048": (lognormal, lognormal_labels)}
    padding = {}
    for name, (lens, labs) in distributions.items():
        padding[name] = {s: padding_fraction(epoch_batches(s, lens, labs, bs), lens)
                         for s in ("random", "length", "balanced")}
        print(f"{name}: padding {padding[name]}", flush=True)

    # throughput on the synthetic cells
    if cpu_quick:
        shape = dict(V1_BASE, hidden_size=128, num_hidden_layers=4, num_attention_heads=4, intermediate_size=256)
        n_batches = 6
    else:
        shape = "6L-256"
        n_batches = 30
    model = build_ours(shape, **LORA).to(device).train()
    params = [q for q in model.parameters() if q.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    lens = synthetic_lengths
    vocab = model.config.vocab_size
    gen = torch.Generator().manual_seed(0)
    token_rows = [torch.randint(1, vocab, (int(n_),), generator=gen) for n_ in lens]

    def step(idx):
        width = int(lens[idx].max())
        ids = torch.zeros(len(idx), width, dtype=torch.long)
        mask = torch.zeros(len(idx), width, dtype=torch.long)
        for r, i in enumerate(idx):
            ids[r, :lens[i]] = token_rows[i]
            mask[r, :lens[i]] = 1
        ids, mask = ids.to(device), mask.to(device)
        y = torch.from_numpy(np.arange(len(idx)) % model.config.num_labels).to(device)
        loss = torch.nn.functional.cross_entropy(model(ids, mask).logits, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    subsets = {}
    for s in ("random", "length", "balanced"):
        batches = [b for b in epoch_batches(s, lens, labels, bs) if len(b) == bs]
        pick = np.linspace(0, len(batches) - 1, n_batches).round().astype(int)
        subsets[s] = [batches[i] for i in pick]
    step(subsets["random"][0])  # warmup
    seconds = {s: 0.0 for s in subsets}
    for i in range(n_batches):  # interleaved so that outside load hits all samplers alike
        for s in subsets:
            sync(device)
            t0 = time.perf_counter()
            step(subsets[s][i])
            sync(device)
            seconds[s] += time.perf_counter() - t0
    throughput = {s: {"cells_per_s": n_batches * bs / seconds[s], "seconds": seconds[s],
                      "subset_padding_fraction": padding_fraction(subsets[s], lens)} for s in subsets}
    for s in throughput:
        throughput[s]["gain_vs_random"] = throughput[s]["cells_per_s"] / throughput["random"]["cells_per_s"]
    print(f"throughput: {throughput}", flush=True)
    write_json(args.json, {"bench": "batching", "machine": machine_info(device), "batch_size": bs,
                           "model": shape if isinstance(shape, str) else {k: shape[k] for k in (
                               "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size")},
                           "batches_timed": n_batches, "padding_fraction": padding, "throughput": throughput,
                           "synthetic_lengths": meta["lengths"]})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
