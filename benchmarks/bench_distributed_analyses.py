"""``embed`` and ``perturb`` throughput in one process against ``torchrun`` with 2 ranks (gloo).

A random 6L-256 Geneformer-shaped checkpoint (saved with a token dictionary) and synthetic
tokenized cells (distinct gene tokens, lengths uniform in [128, 256]); ``run_embed`` over
``--cells`` cells (batch 16) and a ``--genes all`` delete scan of ``--scan_cells`` cells
(batch 32, no null draws), each in a fresh process: one process with torch's default threads
(all cores), then 2 ranks with an equal share of the cores each (OMP_NUM_THREADS = cores / 2).
Timed inside the call, on rank 0 (gather and writing included); start-up not counted.

    python benchmarks/bench_distributed_analyses.py --json out.json [--cells 96] [--scan_cells 4]
"""
from __future__ import annotations

import argparse
import json
import os
import pickle
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent


def build(work: Path, n_cells: int, seed: int = 0) -> tuple[Path, Path]:
    import numpy as np
    import torch
    from datasets import Dataset

    import transformerslocal as tl
    from common import SHAPES

    ckpt = work / "ckpt"
    if not (ckpt / "config.json").is_file():
        torch.manual_seed(seed)
        tl.BertForMaskedLM(tl.BertConfig(**SHAPES["6L-256"])).save_pretrained(ckpt)
        vocab = {"<pad>": 0, "<mask>": 1, **{f"ENSG{i:011d}": i for i in range(2, SHAPES["6L-256"]["vocab_size"])}}
        (ckpt / "token_dictionary.pkl").write_bytes(pickle.dumps(vocab))
    data = work / f"cells_{n_cells}.dataset"
    if not data.is_dir():
        rng = np.random.default_rng(seed)
        ids = [rng.choice(np.arange(2, 20000), size=int(rng.integers(128, 257)), replace=False).tolist()
               for _ in range(n_cells)]
        Dataset.from_dict({"input_ids": ids, "cell_type": [f"t{i % 3}" for i in range(n_cells)]}).save_to_disk(str(data))
    return ckpt, data


def child(what: str, ckpt: str, data: str, out: str) -> None:
    sys.path.insert(0, str(REPO))
    from geneformer_peft.analysis.runs import run_embed, run_perturb
    from geneformer_peft.training import distributed

    t0 = time.perf_counter()
    if what == "embed":
        run_embed(ckpt, data, Path(out) / "emb.parquet", batch_size=16, device="cpu", plots=False)
    else:
        run_perturb(ckpt, data, Path(out) / "scan", genes=["all"], perturb_type="delete", n_null=0, batch_size=32,
                    chunk_cells=1, device="cpu", plots=False)
    seconds = time.perf_counter() - t0
    if distributed.is_main_process():
        import torch

        print(json.dumps({"seconds": seconds, "ranks": distributed.world_size(), "threads": torch.get_num_threads()}))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", type=Path, required=True)
    p.add_argument("--cells", type=int, default=96)
    p.add_argument("--scan_cells", type=int, default=4)
    p.add_argument("--_child", nargs=4, help=argparse.SUPPRESS)
    p.add_argument("--device", default="cpu", help=argparse.SUPPRESS)
    p.add_argument("--workdir", type=Path, default=None, help=argparse.SUPPRESS)
    p.add_argument("--quick", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args._child:
        child(*args._child)
        return 0
    sys.path.insert(0, str(HERE))
    sys.path.insert(0, str(REPO))
    work = Path(args.workdir or tempfile.mkdtemp(prefix="gf_bench_")) / "distributed_analyses"
    work.mkdir(parents=True, exist_ok=True)
    cores = len(os.sched_getaffinity(0))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
               HF_DATASETS_DISABLE_PROGRESS_BARS="1")
    rows = []
    load_start = list(os.getloadavg())
    for what, n in (("embed", args.cells), ("perturb", args.scan_cells)):
        ckpt, data = build(work, n)
        for ranks in (1, 2):
            out = tempfile.mkdtemp(dir=work)
            script = [str(Path(__file__).resolve()), "--json", "-", "--_child", what, str(ckpt), str(data), out]
            if ranks == 1:
                cmd, run_env = [sys.executable, *script], env
            else:
                cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", *script]
                run_env = dict(env, OMP_NUM_THREADS=str(max(1, cores // 2)))
            proc = subprocess.run(cmd, env=run_env, capture_output=True, text=True, check=True)
            r = json.loads([ln for ln in proc.stdout.splitlines() if ln.startswith("{")][-1])
            unit = "perturbations" if what == "perturb" else "cells"
            count = n if what == "embed" else len(__import__("pandas").read_parquet(Path(out) / "scan" /
                                                                               "perturbations.parquet"))
            rows.append({"analysis": what, "ranks": ranks, "threads_per_rank": r["threads"], "items": count,
                         "unit": unit, "seconds": r["seconds"], "per_s": count / r["seconds"]})
            print(f"{what}, {ranks} rank(s): {rows[-1]['per_s']:.1f} {unit}/s", flush=True)
    for row in rows:
        one = next(x for x in rows if x["analysis"] == row["analysis"] and x["ranks"] == 1)
        row["speedup"] = row["per_s"] / one["per_s"]
    result = {"bench": "distributed_analyses", "cores": cores, "loadavg_at_start": load_start,
              "loadavg_at_end": list(os.getloadavg()), "rows": rows}
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=1))
    return 0


def render_section(r: dict, targets: list) -> list[str]:
    """The section of ``docs/benchmarks.md`` (called by ``run_all.py``)."""
    md = ["## `embed` and `perturb`: one process vs torchrun with 2 ranks (CPU, gloo)", "",
          f"Random 6L-256 checkpoint, cells of 128-256 genes; {r['cores']} cores (load average "
          f"{r['loadavg_at_start'][0]:.1f} at the start); 2 ranks get half the cores each. Timed on rank 0 inside "
          "the call (gather and writing included, start-up not). The machine was shared: above 2x on 2 cores means "
          "the one-process run (2 threads) lost more to the other load than the 2 single-thread ranks did; read "
          "these as 'the sharding works', not as a scaling figure.", "",
          "| analysis | ranks | threads/rank | items | seconds | items/s | speed-up |", "|---|---:|---:|---:|---:|---:|---:|"]
    for x in r["rows"]:
        md.append(f"| {x['analysis']} | {x['ranks']} | {x['threads_per_rank']} | {x['items']} {x['unit']} | "
                  f"{x['seconds']:.1f} | {x['per_s']:.1f} | {x['speedup']:.2f}x |")
    return md + [""]


if __name__ == "__main__":
    raise SystemExit(main())
