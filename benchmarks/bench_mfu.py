"""Model FLOPs utilisation (MFU) of our training step against the matmul peak measured
in the same run.

Peak: the best of several timed ``n x n @ n x n`` matmuls in the run's dtype
(2 n^3 FLOPs each; n = 2048 on CPU, 8192 on CUDA).

Achieved: analytic FLOPs of one training step (``common.training_flops``) / its median time.
Per token and layer, matmul weights N_l = 4 d^2 + 2 d d_ff; forward 2 N_l per token plus
attention 4 T d (QK^T and PV, T = padded length); a full fine-tuning step is 3x the
forward (6 N B T + 12 n_layers B T^2 d); a LoRA step skips the frozen weights' gradients
(4 N B T + 12 n_layers B T^2 d). Batches here have no padding. Embedding lookups,
LayerNorm, softmax, GELU/ReLU and the optimizer are not counted (they are memory-bound
work, as in the usual MFU definition).

    python benchmarks/bench_mfu.py --json out.json [--quick] [--device cpu|cuda]
"""
from __future__ import annotations

import time

import torch

from common import (LORA, base_parser, build_ours, interleaved_medians, machine_info, make_train_step, padded_batch,
                    resolve, sync, training_flops, write_json)


def matmul_peak(device: torch.device, dtype: torch.dtype, n: int, seconds: float) -> dict:
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(2):
        a @ b
    sync(device)
    best, calls, t_end = float("inf"), 0, time.perf_counter() + seconds
    while time.perf_counter() < t_end or calls < 3:
        sync(device)
        t0 = time.perf_counter()
        a @ b
        sync(device)
        best = min(best, time.perf_counter() - t0)
        calls += 1
    return {"n": n, "dtype": str(dtype).replace("torch.", ""), "best_s": best, "calls": calls,
            "tflops": 2 * n ** 3 / best / 1e12}


def main(argv=None) -> int:
    p = base_parser(__doc__)
    p.add_argument("--precision", default=None, choices=["fp32", "bf16"],
                   help="default: fp32 on CPU, bf16 on CUDA")
    args = p.parse_args(argv)
    device = resolve(args.device)
    precision = args.precision or ("bf16" if device.type == "cuda" else "fp32")
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    cpu_quick = device.type == "cpu" and args.quick
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    cases = ([dict(shape="6L-256", batch=4, length=512)] if cpu_quick else
             [dict(shape="6L-256", batch=16 if device.type == "cuda" else 8, length=2048 if device.type == "cuda" else 512),
              dict(shape="12L-512", batch=8 if device.type == "cuda" else 2, length=2048 if device.type == "cuda" else 512)])
    warmup, repeats = (1, 3) if cpu_quick else (3, 10)
    peak = matmul_peak(device, dtype, 2048 if device.type == "cpu" else 8192, 3.0 if cpu_quick else 10.0)
    print(f"matmul peak ({peak['dtype']}, n={peak['n']}): {peak['tflops'] * 1e3:.1f} GFLOP/s", flush=True)
    results = []
    for case in cases:
        for method, peft in (("full", {}), ("lora", LORA)):
            model = build_ours(case["shape"], **peft).to(device).train()
            ids, mask = padded_batch(model.config.vocab_size, [case["length"]] * case["batch"], seed=3, device=device)
            labels = torch.zeros(case["batch"], dtype=torch.long, device=device)
            step = make_train_step(model, ids, mask, labels, hf=False, device=device, precision=precision)
            t = interleaved_medians({"step": step}, device, warmup=warmup, repeats=repeats)["step"]
            flops = training_flops(model.config, case["batch"], case["length"], full_finetune=(method == "full"))
            achieved = flops / t["median_s"]
            res = dict(case, method=method, precision=precision, step_flops=flops, median_s=t["median_s"],
                       samples_s=t["samples_s"], achieved_tflops=achieved / 1e12,
                       mfu=achieved / (peak["tflops"] * 1e12))
            results.append(res)
            print(f"{case['shape']} B={case['batch']} T={case['length']} {method}: {achieved / 1e9:.1f} GFLOP/s, "
                  f"MFU {res['mfu']:.1%}", flush=True)
            del model
    peak_after = matmul_peak(device, dtype, peak["n"], 2.0 if cpu_quick else 5.0)
    write_json(args.json, {"bench": "mfu", "machine": machine_info(device), "matmul_peak": peak,
                           "matmul_peak_after": peak_after, "cases": results})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
