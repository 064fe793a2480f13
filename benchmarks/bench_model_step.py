"""Model step, ours vs ``transformers`` BERT (SDPA attention) + ``peft`` LoRA.

Same weights (our base weights loaded into HF, our LoRA A/B copied into peft's), same
trainable set (LoRA r=8 alpha=1 on query/value + pooler + classifier), same batches
(right-padded, one cell at the full length, the rest in [0.85, 1] of it: a length-grouped
batch), same dropout (V1 configs: 0.02). Train step = forward + cross-entropy + backward
+ AdamW step; inference = no-grad forward in eval mode (ours runs the last layer on token 0
alone, the one row the pooler reads). Warmup, then the two models are timed in alternation;
median and minimum are kept, and the report judges on the median (on the shared 2-core CPU
the minimum ratio of identical code strays from 1 by up to 10%: the A/A control of
``bench_inference.py``). Peak memory of one step each after a first one, on CPU in a fresh process under
``common.MEMORY_ENV`` (timings here run with the default allocator).

    python benchmarks/bench_model_step.py --json out.json [--quick] [--device cpu|cuda]
"""
from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from common import (LORA, base_parser, batch_lengths, build_hf_like, build_ours, interleaved_medians, machine_info,
                    make_infer_step, make_train_step, memory_env, padded_batch, peak_memory, resolve, write_json)


def plan(quick: bool, device: torch.device) -> list[dict]:
    if device.type == "cuda":
        return [dict(shape=s, length=n, batch=b) for s, b in (("6L-256", 16), ("12L-512", 8))
                for n in (512, 1024, 2048)]
    if quick:
        return [dict(shape="6L-256", length=256, batch=4), dict(shape="6L-256", length=512, batch=4),
                dict(shape="12L-512", length=256, batch=2), dict(shape="12L-512", length=512, batch=2)]
    return [dict(shape=s, length=n, batch=b) for s, b in (("6L-256", 8), ("12L-512", 4)) for n in (256, 512, 1024)]


def build_case(case: dict, device: torch.device, precision: str):
    """Both models with the same weights, one batch, and each model's train and inference step."""
    ours = build_ours(case["shape"], **LORA)
    hf, parity = build_hf_like(ours)
    ours.to(device)
    hf.to(device)
    lengths = batch_lengths(case["batch"], case["length"], seed=1)
    ids, mask = padded_batch(ours.config.vocab_size, lengths, seed=1, device=device)
    labels = torch.randint(0, ours.config.num_labels, (case["batch"],), generator=torch.Generator().manual_seed(2)).to(device)
    steps = {"train": {"ours": make_train_step(ours, ids, mask, labels, hf=False, device=device, precision=precision),
                       "hf_peft": make_train_step(hf, ids, mask, labels, hf=True, device=device, precision=precision)},
             "inference": {"ours": make_infer_step(ours, ids, mask, hf=False, device=device, precision=precision),
                           "hf_peft": make_infer_step(hf, ids, mask, hf=True, device=device, precision=precision)}}
    models = {"ours": ours, "hf_peft": hf}
    return models, steps, lengths, parity


def set_mode(models: dict, mode: str) -> None:
    for m in models.values():
        m.train(mode == "train")


def measure_memory(case: dict, device: torch.device, precision: str) -> dict:
    """Peak memory of one step of each model in each mode, after one step that creates the
    optimizer state (so that only the step's own activations, gradients and temporaries count)."""
    models, steps, _, _ = build_case(case, device, precision)
    out = {}
    for mode, fns in steps.items():
        set_mode(models, mode)
        for fn in fns.values():
            fn()
        out[mode] = {k: peak_memory(fn, device) for k, fn in fns.items()}
    return out


def memory_in_child(index: int, args, device: torch.device) -> dict:
    """CPU peak RSS is measured in a fresh process under ``MEMORY_ENV`` (see common.py), so
    that the timings in this process run with the allocator users have."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "memory.json"
        cmd = [sys.executable, __file__, "--device", str(device), "--json", str(out), "--precision", args.precision,
               "--memory_case", str(index)] + (["--quick"] if args.quick else [])
        subprocess.run(cmd, cwd=Path(__file__).parent, env=memory_env(), check=True, capture_output=True, text=True)
        return json.loads(out.read_text())


def run_case(index: int, case: dict, device: torch.device, warmup: int, repeats: int, args) -> dict:
    models, steps, lengths, parity = build_case(case, device, args.precision)
    out = dict(case, precision=args.precision, real_token_fraction=sum(lengths) / (len(lengths) * max(lengths)),
               eval_logits_max_abs_diff=parity)
    timings = {}
    for mode, fns in steps.items():
        set_mode(models, mode)
        timings[mode] = interleaved_medians(fns, device, warmup=warmup, repeats=repeats)
    del models, steps
    mem = memory_in_child(index, args, device) if device.type == "cpu" else measure_memory(case, device, args.precision)
    for mode, times in timings.items():
        res = {}
        for k in times:
            res[k] = {**times[k], "cells_per_s": case["batch"] / times[k]["median_s"],
                      "cells_per_s_best": case["batch"] / times[k]["min_s"], "memory": mem[mode][k]}
        res["speed_ratio"] = times["hf_peft"]["median_s"] / times["ours"]["median_s"]
        res["speed_ratio_min"] = times["hf_peft"]["min_s"] / times["ours"]["min_s"]
        res["cpu_time_ratio"] = times["hf_peft"]["median_cpu_s"] / max(times["ours"]["median_cpu_s"], 1e-12)
        ours_mib, hf_mib = mem[mode]["ours"]["step_peak_mib"], mem[mode]["hf_peft"]["step_peak_mib"]
        res["memory_ratio"] = ours_mib / max(hf_mib, 1e-9)
        out[mode] = res
        print(f"{case['shape']} L={case['length']} B={case['batch']} {mode}: ours {res['ours']['cells_per_s']:.2f} "
              f"cells/s, hf+peft {res['hf_peft']['cells_per_s']:.2f} cells/s, ratio {res['speed_ratio']:.3f} "
              f"(min {res['speed_ratio_min']:.3f}), peak MiB ours {ours_mib:.0f} hf {hf_mib:.0f}", flush=True)
    return out


def dropout_case(device: torch.device, warmup: int, repeats: int) -> dict:
    """Dropout alone, forward + backward, on one layer's attention probabilities (B=4, h=4,
    512 x 512): ``F.dropout`` (what SDPA and transformers use) vs ours."""
    import torch.nn.functional as F

    from transformerslocal.dropout import dropout

    x = torch.randn(4, 4, 512, 512, device=device, requires_grad=True)
    g = torch.randn_like(x)

    def run(fn):
        def step():
            x.grad = None
            fn(x).backward(g)
        return step

    fns = {"ours": run(lambda t: dropout(t, 0.02)), "torch": run(lambda t: F.dropout(t, 0.02, True))}
    times = interleaved_medians(fns, device, warmup=warmup, repeats=repeats)
    out = {"shape": list(x.shape), "p": 0.02, **{k: times[k] for k in fns}}
    out["speed_ratio"] = times["torch"]["median_s"] / times["ours"]["median_s"]
    print(f"dropout {tuple(x.shape)}: torch {times['torch']['median_s'] * 1e3:.1f} ms, ours "
          f"{times['ours']['median_s'] * 1e3:.1f} ms, ratio {out['speed_ratio']:.2f}", flush=True)
    return out


def main(argv=None) -> int:
    p = base_parser(__doc__)
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    p.add_argument("--memory_case", type=int, default=None, help="internal: measure only the memory of case N")
    p.add_argument("--repeats", type=int, default=None,
                   help="timed steps per model and mode (default 5 with --quick on CPU, else 10)")
    args = p.parse_args(argv)
    device = resolve(args.device)
    if args.memory_case is not None:
        case = plan(args.quick, device)[args.memory_case]
        args.json.write_text(json.dumps(measure_memory(case, device, args.precision)))
        return 0
    warmup, repeats = (1, 5) if args.quick and device.type == "cpu" else (3, 10)
    repeats = args.repeats or repeats
    cases = [run_case(i, c, device, warmup, repeats, args) for i, c in enumerate(plan(args.quick, device))]
    write_json(args.json, {"bench": "model_step", "machine": machine_info(device), "warmup": warmup,
                           "repeats": repeats, "lora": LORA, "cases": cases,
                           "dropout": dropout_case(device, warmup=2, repeats=10)})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
