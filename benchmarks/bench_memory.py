"""Mixed precision (bf16 autocast vs fp32) and gradient checkpointing (on vs off): time
and peak memory of one training step of our model at the 12L-512 V1 shape with LoRA
(r=8, query/value; pooler + classifier trainable).

Every configuration runs in its own fresh process (``--one``) so that peak memory is not
hidden by memory a previous configuration left resident; the four are run in turn by
the parent. Peak memory: see ``common.peak_memory`` (CUDA: allocated bytes; CPU: peak
RSS increase during the step).

    python benchmarks/bench_memory.py --json out.json [--quick] [--device cpu|cuda]
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

from common import (LORA, base_parser, build_ours, interleaved_medians, machine_info, make_train_step, padded_batch,
                    peak_memory, resolve, write_json)

CONFIGS = [("fp32", False), ("fp32", True), ("bf16", False), ("bf16", True)]


def one(device: torch.device, precision: str, ckpt: bool, batch: int, length: int, repeats: int) -> dict:
    model = build_ours("12L-512", **LORA).to(device).train()
    if ckpt:
        model.gradient_checkpointing_enable()
    ids, mask = padded_batch(model.config.vocab_size, [length] * batch, seed=5, device=device)
    labels = torch.zeros(batch, dtype=torch.long, device=device)
    step = make_train_step(model, ids, mask, labels, hf=False, device=device, precision=precision)
    step()  # optimizer state exists from here on
    mem = peak_memory(step, device)
    t = interleaved_medians({"s": step}, device, warmup=0, repeats=repeats)["s"]
    return {"precision": precision, "gradient_checkpointing": ckpt, "batch": batch, "length": length,
            "median_s": t["median_s"], "samples_s": t["samples_s"], "memory": mem}


def main(argv=None) -> int:
    p = base_parser(__doc__)
    p.add_argument("--one", default=None, help="internal: precision,ckpt (run one config)")
    p.add_argument("--length", type=int, default=None)
    p.add_argument("--batch", type=int, default=None)
    args = p.parse_args(argv)
    device = resolve(args.device)
    cpu_quick = args.quick and device.type == "cpu"
    # the gradient-checkpointing target is stated at 12L, 2,048 tokens: one cell of that length
    # fits a CPU step (a few GiB, seconds), so --quick keeps the length and shrinks the batch
    length = args.length or 2048
    batch = args.batch or (1 if device.type == "cpu" else 8)
    repeats = 1 if cpu_quick else 5
    if args.one:
        precision, ckpt = args.one.split(",")
        res = one(device, precision, ckpt == "1", batch, length, repeats)
        Path(args.json).write_text(json.dumps(res))
        return 0
    results = []
    for precision, ckpt in CONFIGS:
        sub = Path(str(args.json) + f".{precision}{int(ckpt)}.json")
        cmd = [sys.executable, __file__, "--device", str(device), "--json", str(sub), "--one",
               f"{precision},{int(ckpt)}", "--length", str(length), "--batch", str(batch)] + (["--quick"] if args.quick else [])
        proc = subprocess.run(cmd, cwd=Path(__file__).parent, env=os.environ.copy(), capture_output=True, text=True)
        if proc.returncode != 0:
            results.append({"precision": precision, "gradient_checkpointing": ckpt, "error": proc.stderr[-2000:]})
            print(f"{precision} ckpt={ckpt}: FAILED\n{proc.stderr[-2000:]}", flush=True)
            continue
        res = json.loads(sub.read_text())
        sub.unlink()
        results.append(res)
        print(f"{precision} ckpt={ckpt}: {res['median_s']:.2f} s/step, peak {res['memory']['step_peak_mib']:.0f} MiB",
              flush=True)
    write_json(args.json, {"bench": "memory", "machine": machine_info(device), "shape": "12L-512", "batch": batch,
                           "length": length, "results": results})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
