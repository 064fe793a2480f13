"""Mixed precision (bf16 autocast vs fp32) and gradient checkpointing (on vs off): time
and peak memory of one training step of our model at the 12L-512 V1 shape with LoRA
(r=8, query/value; pooler + classifier trainable).

Every configuration runs in fresh processes (``--one``) so that peak memory is not
hidden by memory a previous configuration left resident: one measures peak memory (under
``common.MEMORY_ENV``), another the step time (default allocator); the parent runs them
in turn. Peak memory: see ``common.peak_memory`` (CUDA: allocated bytes; CPU: peak
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

from common import (LORA, base_parser, build_ours, interleaved_medians, machine_info, make_train_step, memory_env,
                    padded_batch, peak_memory, resolve, write_json)

CONFIGS = [("fp32", False), ("fp32", True), ("bf16", False), ("bf16", True)]


def one(device: torch.device, precision: str, ckpt: bool, batch: int, length: int, repeats: int, what: str) -> dict:
    model = build_ours("12L-512", **LORA).to(device).train()
    if ckpt:
        model.gradient_checkpointing_enable()
    ids, mask = padded_batch(model.config.vocab_size, [length] * batch, seed=5, device=device)
    labels = torch.zeros(batch, dtype=torch.long, device=device)
    step = make_train_step(model, ids, mask, labels, hf=False, device=device, precision=precision)
    step()  # optimizer state exists from here on; also the warm-up
    if what == "memory":
        return {"memory": peak_memory(step, device)}
    t = interleaved_medians({"s": step}, device, warmup=0, repeats=repeats)["s"]
    return {"median_s": t["median_s"], "samples_s": t["samples_s"]}


def main(argv=None) -> int:
    p = base_parser(__doc__)
    p.add_argument("--one", default=None, help="internal: precision,ckpt,time|memory (run one config)")
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
        precision, ckpt, what = args.one.split(",")
        res = one(device, precision, ckpt == "1", batch, length, repeats, what)
        Path(args.json).write_text(json.dumps(res))
        return 0
    results = []
    for precision, ckpt in CONFIGS:
        res = {"precision": precision, "gradient_checkpointing": ckpt, "batch": batch, "length": length}
        # memory under MEMORY_ENV, time with the default allocator: two fresh processes
        for what, env in (("memory", memory_env()), ("time", os.environ.copy())):
            sub = Path(str(args.json) + f".{precision}{int(ckpt)}{what}.json")
            cmd = [sys.executable, __file__, "--device", str(device), "--json", str(sub), "--one",
                   f"{precision},{int(ckpt)},{what}", "--length", str(length), "--batch", str(batch)] + \
                (["--quick"] if args.quick else [])
            proc = subprocess.run(cmd, cwd=Path(__file__).parent, env=env, capture_output=True, text=True)
            if proc.returncode != 0:
                res["error"] = proc.stderr[-2000:]
                break
            res.update(json.loads(sub.read_text()))
            sub.unlink()
        results.append(res)
        if "error" in res:
            print(f"{precision} ckpt={ckpt}: FAILED\n{res['error']}", flush=True)
            continue
        print(f"{precision} ckpt={ckpt}: {res['median_s']:.2f} s/step, peak {res['memory']['step_peak_mib']:.0f} MiB",
              flush=True)
    write_json(args.json, {"bench": "memory", "machine": machine_info(device), "shape": "12L-512", "batch": batch,
                           "length": length, "results": results})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
