"""Model step, ours vs ``transformers`` BERT (SDPA attention) + ``peft`` LoRA.

Same weights (our base weights loaded into HF, our LoRA A/B copied into peft's), same
trainable set (LoRA r=8 alpha=1 on query/value + pooler + classifier), same batches
(right-padded, one cell at the full length, the rest in [0.85, 1] of it: a length-grouped
batch), same dropout (V1 configs: 0.02). Train step = forward + cross-entropy + backward
+ AdamW step; inference = no-grad forward in eval mode. Warmup, then the two models are
timed in alternation; median and minimum are kept (on a shared CPU, load from other
processes only ever adds time, so the minimum is the steadier estimate of the step's own
cost); peak memory of one more step each.

    python benchmarks/bench_model_step.py --json out.json [--quick] [--device cpu|cuda]
"""
from __future__ import annotations

import torch

from common import (LORA, base_parser, batch_lengths, build_hf_like, build_ours, interleaved_medians,
                    machine_info, make_infer_step, make_train_step, padded_batch, peak_memory, resolve, write_json)


def plan(quick: bool, device: torch.device) -> list[dict]:
    if device.type == "cuda":
        return [dict(shape=s, length=n, batch=b) for s, b in (("6L-256", 16), ("12L-512", 8))
                for n in (512, 1024, 2048)]
    if quick:
        return [dict(shape="6L-256", length=256, batch=4), dict(shape="6L-256", length=512, batch=4),
                dict(shape="12L-512", length=256, batch=2), dict(shape="12L-512", length=512, batch=2)]
    return [dict(shape=s, length=n, batch=b) for s, b in (("6L-256", 8), ("12L-512", 4)) for n in (256, 512, 1024)]


def run_case(case: dict, device: torch.device, warmup: int, repeats: int, precision: str) -> dict:
    ours = build_ours(case["shape"], **LORA)
    hf, parity = build_hf_like(ours)
    ours.to(device)
    hf.to(device)
    lengths = batch_lengths(case["batch"], case["length"], seed=1)
    ids, mask = padded_batch(ours.config.vocab_size, lengths, seed=1, device=device)
    labels = torch.randint(0, ours.config.num_labels, (case["batch"],), generator=torch.Generator().manual_seed(2)).to(device)
    out = dict(case, precision=precision, real_token_fraction=sum(lengths) / (len(lengths) * max(lengths)),
               eval_logits_max_abs_diff=parity)
    for mode in ("train", "inference"):
        if mode == "train":
            ours.train()
            hf.train()
            fns = {"ours": make_train_step(ours, ids, mask, labels, hf=False, device=device, precision=precision),
                   "hf_peft": make_train_step(hf, ids, mask, labels, hf=True, device=device, precision=precision)}
        else:
            ours.eval()
            hf.eval()
            fns = {"ours": make_infer_step(ours, ids, mask, hf=False, device=device, precision=precision),
                   "hf_peft": make_infer_step(hf, ids, mask, hf=True, device=device, precision=precision)}
        times = interleaved_medians(fns, device, warmup=warmup, repeats=repeats)
        mem = {k: peak_memory(fn, device) for k, fn in fns.items()}
        res = {}
        for k in fns:
            res[k] = {**times[k], "cells_per_s": case["batch"] / times[k]["median_s"],
                      "cells_per_s_best": case["batch"] / times[k]["min_s"], "memory": mem[k]}
        res["speed_ratio"] = times["hf_peft"]["median_s"] / times["ours"]["median_s"]
        res["speed_ratio_min"] = times["hf_peft"]["min_s"] / times["ours"]["min_s"]
        res["cpu_time_ratio"] = times["hf_peft"]["median_cpu_s"] / max(times["ours"]["median_cpu_s"], 1e-12)
        res["memory_ratio"] = mem["ours"]["step_peak_mib"] / max(mem["hf_peft"]["step_peak_mib"], 1e-9)
        out[mode] = res
        print(f"{case['shape']} L={case['length']} B={case['batch']} {mode}: ours {res['ours']['cells_per_s']:.2f} "
              f"cells/s, hf+peft {res['hf_peft']['cells_per_s']:.2f} cells/s, ratio {res['speed_ratio']:.3f} (min {res['speed_ratio_min']:.3f}), "
              f"peak MiB ours {mem['ours']['step_peak_mib']:.0f} hf {mem['hf_peft']['step_peak_mib']:.0f}", flush=True)
    del ours, hf
    return out


def main(argv=None) -> int:
    p = base_parser(__doc__)
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    args = p.parse_args(argv)
    device = resolve(args.device)
    warmup, repeats = (1, 5) if args.quick and device.type == "cpu" else (3, 10)
    cases = [run_case(c, device, warmup, repeats, args.precision) for c in plan(args.quick, device)]
    write_json(args.json, {"bench": "model_step", "machine": machine_info(device), "warmup": warmup,
                           "repeats": repeats, "lora": LORA, "cases": cases})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
