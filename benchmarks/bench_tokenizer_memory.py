"""Peak memory of chunked tokenization for N and 10N cells.

Writes two synthetic raw-count ``.h5ad`` files (N and 10N cells), then tokenizes each in a
fresh subprocess (backed file, ``chunk_size`` cells at a time) and reads the process's
resident set size after imports and its peak (``VmHWM``, reset after the
imports) during tokenization. With chunking, the peak
should barely grow with the number of cells (the output dataset is an Arrow file on disk).

Usage::

    python benchmarks/bench_tokenizer_memory.py [--cells 2000] [--genes 4000] [--chunk_size 512] [--json out.json]

Prints a markdown table and the JSON result to stdout. Runs in well under two minutes.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _status_mib(field: str) -> float:
    """``VmRSS`` / ``VmHWM`` of this process in MiB (Linux ``/proc``; falls back to getrusage)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _reset_peak() -> None:
    """Reset ``VmHWM`` to the current RSS where the kernel allows it (Linux >= 4.0)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def child(path: str, vocab: str, chunk_size: int) -> None:
    """Tokenize ``path`` and print a JSON line of memory and time."""
    import pickle

    sys.path.insert(0, str(REPO))
    import datasets  # noqa: F401  (import cost counted in the baseline)

    from geneformer_peft.data.rank_value import tokenize_anndata

    tokens, medians = pickle.loads(Path(vocab).read_bytes())
    baseline = _status_mib("VmRSS")
    _reset_peak()
    start = time.perf_counter()
    dataset, stats = tokenize_anndata(
        path, token_dictionary=tokens, gene_median_dictionary=medians, chunk_size=chunk_size,
        label_column="cell_type", show_progress=False, return_stats=True,
    )
    elapsed = time.perf_counter() - start
    peak = _status_mib("VmHWM")
    print(json.dumps({
        "cells": stats.n_cells_kept, "chunk_size": chunk_size, "seconds": round(elapsed, 2),
        "cells_per_s": round(stats.n_cells_kept / elapsed), "baseline_rss_mib": round(baseline, 1),
        "peak_rss_mib": round(peak, 1), "increase_mib": round(peak - baseline, 1),
        "median_length": stats.length_median, "file_mib": round(Path(path).stat().st_size / 2**20, 1),
    }))


def write_h5ad(path: Path, n_cells: int, n_genes: int, seed: int) -> None:
    """Write a synthetic raw-count file block by block (~10% non-zero, integer counts)."""
    import anndata
    import numpy as np
    import pandas as pd
    import scipy.sparse as sp

    rng = np.random.default_rng(seed)
    blocks = []
    for start in range(0, n_cells, 1000):
        rows = min(1000, n_cells - start)
        block = sp.random(rows, n_genes, density=0.1, format="csr", random_state=rng, dtype=np.float32)
        block.data = np.ceil(block.data * 30).astype(np.float32)
        blocks.append(block)
    X = sp.vstack(blocks, format="csr")
    obs = pd.DataFrame({"cell_type": pd.Categorical(rng.choice(["A", "B", "C"], n_cells))},
                       index=[f"c{i}" for i in range(n_cells)])
    var = pd.DataFrame(index=[f"ENSG{i:011d}" for i in range(n_genes)])
    anndata.AnnData(X=X, obs=obs, var=var).write_h5ad(path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cells", type=int, default=2000, help="N; files of N and 10N cells are measured.")
    parser.add_argument("--genes", type=int, default=4000, help="Genes per file.")
    parser.add_argument("--chunk_size", type=int, default=512, help="Cells per chunk.")
    parser.add_argument("--json", type=Path, help="Also write the JSON result to this file.")
    parser.add_argument("--_child", nargs=3, help=argparse.SUPPRESS)
    # accepted so that run_all.py can call every module alike; tokenization runs on the CPU
    parser.add_argument("--device", default="cpu", help=argparse.SUPPRESS)
    parser.add_argument("--workdir", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--quick", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args._child:
        child(args._child[0], args._child[1], int(args._child[2]))
        return

    import pickle

    from common import memory_env  # peak RSS under MEMORY_ENV, as every CPU memory figure here

    results = []
    with tempfile.TemporaryDirectory() as tmp:
        genes = [f"ENSG{i:011d}" for i in range(args.genes)]
        tokens = {"<pad>": 0, "<mask>": 1, **{g: i + 2 for i, g in enumerate(genes)}}
        medians = {g: 1.0 + (i % 7) for i, g in enumerate(genes)}
        vocab = Path(tmp) / "vocab.pkl"
        vocab.write_bytes(pickle.dumps((tokens, medians)))
        for n_cells in (args.cells, 10 * args.cells):
            path = Path(tmp) / f"cells_{n_cells}.h5ad"
            write_h5ad(path, n_cells, args.genes, seed=n_cells)
            out = subprocess.run(
                [sys.executable, __file__, "--_child", str(path), str(vocab), str(args.chunk_size)],
                check=True, capture_output=True, text=True, env=memory_env(),
            )
            results.append(json.loads(out.stdout.strip().splitlines()[-1]))

    print("| cells | file MiB | chunk | seconds | cells/s | baseline RSS MiB | peak RSS MiB | increase MiB |")
    print("|---|---|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r['cells']} | {r['file_mib']} | {r['chunk_size']} | {r['seconds']} | {r['cells_per_s']} | "
              f"{r['baseline_rss_mib']} | {r['peak_rss_mib']} | {r['increase_mib']} |")
    summary = {"benchmark": "tokenizer_memory", "genes": args.genes, "results": results}
    print(json.dumps(summary, indent=2))
    if args.json:
        args.json.write_text(json.dumps(summary, indent=2) + "\n")


if __name__ == "__main__":
    main()
