"""Tokenization throughput against the number of worker processes (``tokenize --nproc N``).

Writes one synthetic raw-count ``.h5ad`` (default 20,000 cells x 4,000 genes, ~10% non-zero,
the generator of ``bench_tokenizer_memory.py``), then tokenizes it with each N of ``--nprocs``
in a fresh child process per run (the default allocator; the dictionaries loaded before the
clock starts; worker start-up is inside the timed call), N values interleaved, ``--repeats``
times each. Reports the median wall-clock cells/s, the speed-up over N=1, and the CPU seconds
of the parent and its workers (``getrusage``), so that cells per CPU-second, which does not
depend on what else the machine runs, can be read next to the wall-clock figure, with the load
average before and after. Every run's output is checked to equal N=1's (same number of tokens,
same checksum).

Two figures read the CPU seconds: ``cpu_ratio``, all processes' CPU seconds at N over N=1's
(1.0: the work is split, not added to), and ``idle_speedup_bound``, the speed-up N idle cores
would give if the parent's CPU time ran alone and the workers' in parallel:
``cpu(N=1) / (parent_cpu(N) + workers_cpu(N) / N)`` (pessimistic: the parent's appending of
the shards overlaps the workers).

    python benchmarks/bench_tokenize_nproc.py --json out.json [--cells 20000] [--nprocs 1,2] [--repeats 3]

``--quick``: 4,000 cells, 1 repeat (a smoke run). Target (issue 25): >= 1.4x cells/s at N=2.
"""
from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
TARGET_SPEEDUP = 1.4


def child(path: str, vocab: str, nproc: int, chunk_size: int) -> None:
    """Tokenize ``path`` with ``nproc`` workers and print one JSON line."""
    import pickle
    import resource

    sys.path.insert(0, str(REPO))
    import datasets  # noqa: F401  (imports outside the clock)
    import numpy as np

    from geneformer_peft.data.rank_value import tokenize_anndata

    tokens, medians = pickle.loads(Path(vocab).read_bytes())
    cpu0 = time.process_time()
    t0 = time.perf_counter()
    dataset, stats = tokenize_anndata(path, token_dictionary=tokens, gene_median_dictionary=medians, nproc=nproc,
                                      chunk_size=chunk_size, label_column="cell_type", show_progress=False,
                                      return_stats=True)
    wall = time.perf_counter() - t0
    parent_cpu = time.process_time() - cpu0
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    ids = dataset.data.column("input_ids").combine_chunks().values.to_numpy()
    print(json.dumps({"nproc": nproc, "cells": stats.n_cells_kept, "seconds": wall,
                      "cells_per_s": stats.n_cells_kept / wall, "parent_cpu_s": parent_cpu,
                      "workers_cpu_s": children.ru_utime + children.ru_stime,
                      "n_tokens": int(ids.size), "checksum": int((ids * (np.arange(ids.size) % 9973 + 1)).sum())}))


def main(argv=None) -> int:
    import argparse

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", type=Path, required=True)
    p.add_argument("--cells", type=int, default=20000)
    p.add_argument("--genes", type=int, default=4000)
    p.add_argument("--chunk_size", type=int, default=512)
    p.add_argument("--nprocs", default="1,2", help="comma-separated numbers of worker processes (1 = in process)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--_child", nargs=4, help=argparse.SUPPRESS)
    # accepted so that run_all.py can call every module alike; tokenization runs on the CPU
    p.add_argument("--device", default="cpu", help=argparse.SUPPRESS)
    p.add_argument("--workdir", default=None, help=argparse.SUPPRESS)
    p.add_argument("--quick", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.quick:
        args.cells, args.repeats = min(args.cells, 4000), 1
    if args._child:
        child(args._child[0], args._child[1], int(args._child[2]), int(args._child[3]))
        return 0

    import pickle

    sys.path.insert(0, str(HERE))
    from bench_tokenizer_memory import write_h5ad

    nprocs = [int(x) for x in args.nprocs.split(",")]
    runs: dict[int, list[dict]] = {n: [] for n in nprocs}
    load_start = list(os.getloadavg())
    with tempfile.TemporaryDirectory(prefix="gf_tok_nproc_") as tmp:
        genes = [f"ENSG{i:011d}" for i in range(args.genes)]
        tokens = {"<pad>": 0, "<mask>": 1, **{g: i + 2 for i, g in enumerate(genes)}}
        medians = {g: 1.0 + (i % 7) for i, g in enumerate(genes)}
        vocab = Path(tmp) / "vocab.pkl"
        vocab.write_bytes(pickle.dumps((tokens, medians)))
        path = Path(tmp) / "cells.h5ad"
        write_h5ad(path, args.cells, args.genes, seed=0)
        for _ in range(args.repeats):
            for n in nprocs:
                out = subprocess.run([sys.executable, __file__, "--json", "-", "--_child", str(path), str(vocab),
                                      str(n), str(args.chunk_size)], check=True, capture_output=True, text=True)
                runs[n].append(json.loads(out.stdout.strip().splitlines()[-1]))
                print(f"nproc {n}: {runs[n][-1]['cells_per_s']:.0f} cells/s", flush=True)
    reference = runs[nprocs[0]][0]
    identical = all(r["n_tokens"] == reference["n_tokens"] and r["checksum"] == reference["checksum"]
                    for rs in runs.values() for r in rs)
    rows = []
    for n in nprocs:
        median_wall = statistics.median(r["seconds"] for r in runs[n])
        cpu = statistics.median(r["parent_cpu_s"] + r["workers_cpu_s"] for r in runs[n])
        rows.append({"nproc": n, "median_seconds": median_wall, "cells_per_s": args.cells / median_wall,
                     "cpu_s": cpu, "cells_per_cpu_s": args.cells / cpu,
                     "parent_cpu_s": statistics.median(r["parent_cpu_s"] for r in runs[n]),
                     "workers_cpu_s": statistics.median(r["workers_cpu_s"] for r in runs[n]),
                     "runs_cells_per_s": [r["cells_per_s"] for r in runs[n]]})
    base = rows[0]
    for row in rows:
        row["speedup"] = row["cells_per_s"] / base["cells_per_s"]
        row["cpu_ratio"] = row["cpu_s"] / base["cpu_s"]
        # a worker of N > 1 does a 1/N share; N = 1 runs everything in the parent
        share = row["workers_cpu_s"] / row["nproc"] if row["nproc"] > 1 else 0.0
        row["idle_speedup_bound"] = base["cpu_s"] / (row["parent_cpu_s"] + share)
    import platform

    result = {"bench": "tokenize_nproc", "cells": args.cells, "genes": args.genes, "chunk_size": args.chunk_size,
              "repeats": args.repeats, "identical_outputs": identical, "rows": rows,
              "machine": {"cpu_affinity": len(os.sched_getaffinity(0)), "python": platform.python_version(),
                          "loadavg_at_start": load_start, "loadavg_at_end": list(os.getloadavg())}}
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))
    return 0


def render_section(r: dict, targets: list) -> list[str]:
    """The section of ``docs/benchmarks.md`` (called by ``run_all.py``)."""
    md = ["## Tokenization with worker processes (`tokenize --nproc N`)", "",
          f"Synthetic raw counts, {r['cells']:,} cells x {r['genes']:,} genes, chunks of {r['chunk_size']}; each run "
          f"in a fresh process, N interleaved, median of {r['repeats']}; worker start-up inside the timing. "
          f"{r['machine']['cpu_affinity']} usable cores, load average {r['machine']['loadavg_at_start'][0]:.1f} at "
          f"the start and {r['machine']['loadavg_at_end'][0]:.1f} at the end (other work on the machine takes cores "
          f"from the workers). Outputs identical to N=1: {'yes' if r['identical_outputs'] else '**NO**'}. "
          "Each worker reads its own ranges of chunks from the file and writes an Arrow shard; the parent assigns "
          "the ranges and appends the shards in order, so no counts travel between processes. *CPU ratio*: all "
          "processes' CPU seconds over N=1's (1.00: the work is split, not added to). *Idle bound*: N=1's CPU "
          "seconds / (parent CPU + workers' CPU / N), the speed-up on N idle cores with the parent's work "
          "counted as serial.", "",
          "| N | median s | cells/s | speed-up | CPU s (parent + workers) | CPU ratio | cells per CPU-s | idle bound |",
          "|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for x in r["rows"]:
        md.append(f"| {x['nproc']} | {x['median_seconds']:.2f} | {x['cells_per_s']:,.0f} | {x['speedup']:.2f}x | "
                  f"{x['cpu_s']:.2f} ({x.get('parent_cpu_s', float('nan')):.2f} + "
                  f"{x.get('workers_cpu_s', float('nan')):.2f}) | {x.get('cpu_ratio', float('nan')):.2f} | "
                  f"{x['cells_per_cpu_s']:,.0f} | {x.get('idle_speedup_bound', float('nan')):.2f}x |")
    two = next((x for x in r["rows"] if x["nproc"] == 2), None)
    if two is not None:
        targets.append((f"tokenize --nproc 2 >= {TARGET_SPEEDUP}x the cells/s of 1 ({r['cells']:,} cells)",
                        two["speedup"] >= TARGET_SPEEDUP and r["identical_outputs"],
                        f"{two['speedup']:.2f}x at load average {r['machine']['loadavg_at_start'][0]:.1f} on "
                        f"{r['machine']['cpu_affinity']} cores" + (
                            f"; CPU ratio {two['cpu_ratio']:.2f}, idle-core bound {two['idle_speedup_bound']:.2f}x"
                            if "cpu_ratio" in two else "")))
    return md + [""]


if __name__ == "__main__":
    raise SystemExit(main())
