"""What the run-safety and compatibility checks cost each command on the shipped example.

Runs every command that reads the example (tokenize, split, finetune of one fold, predict,
embed, perturb) as a user does (``python -m geneformer_peft.cli ...`` in a fresh process), once
with the code of a base revision (checked out into a temporary git worktree) and once with this
checkout's, alternating which goes first, and reports the median wall time of each and their
ratio. Target: no command slower than 1.03x the base, judged on CPU time (user + system of the
command's process), which a machine shared with other jobs moves far less than wall time.

    python benchmarks/bench_command_overhead.py [--base 96feb63] [--repeats 3] [--epochs 20] [--json out.json]

Inputs are made once with this checkout: raw counts of the example's 500 cells and 2,000 genes
(the generator make_example.py uses), its folds, and one fine-tuned fold (for predict).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CKPT = REPO / "Pretrain_ckpts" / "geneformer-tiny-example"
TEST0 = REPO / "example_py" / "data" / "synthetic" / "0" / "synthetic_test0.dataset"


def _env(code: Path) -> dict:
    env = dict(os.environ, PYTHONPATH=str(code), HF_DATASETS_DISABLE_PROGRESS_BARS="1", PYTHONWARNINGS="ignore")
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


def run_cli(code: Path, argv: list[str]) -> tuple[float, float]:
    """(wall seconds, CPU seconds: user + system) of ``geneformer-peft ARGV`` run with the package at
    ``code``. CPU time counts the work done and moves far less than wall time on a shared machine."""
    import resource

    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "geneformer_peft.cli", "--log_level", "WARNING", *argv], cwd=code,
                          env=_env(code), capture_output=True, text=True)
    seconds = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode != 0:
        raise RuntimeError(f"{code}: {' '.join(argv)} exited {proc.returncode}:\n{proc.stderr[-3000:]}")
    return seconds, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def commands(work: Path, tag: str, run: int, epochs: int) -> dict[str, list[str]]:
    """Each command's argv, writing under ``work/<tag><run>/``."""
    out = work / f"{tag}{run}"
    genes = json.loads((CKPT / "tokenizer.json").read_text())["model"]["vocab"]
    two_genes = [g for g in genes if not g.startswith("<")][:2]
    return {
        "tokenize": ["tokenize", "--input", str(work / "raw.h5ad"), "--output", str(out / "cells.dataset"),
                     "--token_dictionary", str(CKPT / "token_dictionary.pkl"),
                     "--gene_median_dictionary", str(CKPT / "gene_median_dictionary.pkl"),
                     "--label_column", "cell_type", "--model_input_size", "256", "--no_progress"],
        "split": ["split", "--input", str(work / "cells.dataset"), "--dataset_name", "synthetic", "--output_dir",
                  str(out / "folds"), "--n_folds", "5", "--label_column", "cell_type"],
        "finetune": ["finetune", "--dataset_name", "synthetic", "--data_path", str(REPO / "example_py" / "data"),
                     "--model_path", str(CKPT), "--output_path", str(out / "save"), "--folds", "0", "--epoch",
                     str(epochs), "--lr", "1e-2", "--early_stopping_patience", "0", "--select_epoch_by", "loss",
                     "--device", "cpu", "--no_progress", "--num_threads", "1"],
        "predict": ["predict", "--model_path", str(work / "fold"), "--input", str(TEST0), "--output",
                    str(out / "predictions.csv"), "--device", "cpu"],
        "embed": ["embed", "--model_path", str(CKPT), "--input", str(TEST0), "--output", str(out / "emb.csv"),
                  "--device", "cpu", "--no_plots"],
        "perturb": ["perturb", "--model_path", str(CKPT), "--input", str(TEST0), "--output_dir", str(out / "perturb"),
                    "--genes", *two_genes, "--perturb_type", "delete", "--max_ncells", "30", "--device", "cpu",
                    "--no_plots"],
    }


def prepare(work: Path) -> None:
    """Raw counts, their tokenized cells and one fine-tuned fold, made with this checkout."""
    sys.path.insert(0, str(REPO))
    from geneformer_peft.data.synthetic import generate_counts

    generate_counts(n_cells=500, n_genes=2000, n_cell_types=5, seed=0).write_h5ad(work / "raw.h5ad")
    first = commands(work, "prep", 0, 2)
    run_cli(REPO, first["tokenize"])
    shutil.copytree(work / "prep0" / "cells.dataset", work / "cells.dataset")
    run_cli(REPO, first["finetune"])
    shutil.copytree(work / "prep0" / "save" / "Gene_token_prompt" / "synthetic" / "0", work / "fold")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", default="96feb63", help="The revision to compare with (%(default)s).")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=20, help="finetune epochs (the example's: 20).")
    parser.add_argument("--only", default=None, help="Comma-separated commands to time (default: all).")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work, base = Path(tmp) / "work", Path(tmp) / "base"
        work.mkdir()
        subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", str(base), args.base], check=True,
                       capture_output=True)
        try:
            prepare(work)
            names = list(commands(work, "x", 0, args.epochs))
            if args.only:
                names = [n for n in names if n in args.only.split(",")]
            times: dict[str, dict[str, list[tuple[float, float]]]] = {n: {"base": [], "new": []} for n in names}
            for run in range(args.repeats):
                order = [("base", base), ("new", REPO)] if run % 2 == 0 else [("new", REPO), ("base", base)]
                for name in names:
                    for tag, code in order:
                        wall, cpu = run_cli(code, commands(work, tag, run, args.epochs)[name])
                        times[name][tag].append((wall, cpu))
                        print(f"run {run} {name} {tag}: {wall:.2f} s wall, {cpu:.2f} s CPU", flush=True)
        finally:
            subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force", str(base)], capture_output=True)
    rows = {}
    for name, t in times.items():
        med = {tag: [statistics.median(x[i] for x in t[tag]) for i in (0, 1)] for tag in ("base", "new")}
        cpu_ratio = med["new"][1] / med["base"][1]
        rows[name] = {"base_runs": t["base"], "new_runs": t["new"], "base_wall": med["base"][0],
                      "new_wall": med["new"][0], "wall_ratio": med["new"][0] / med["base"][0],
                      "base_cpu": med["base"][1], "new_cpu": med["new"][1], "cpu_ratio": cpu_ratio,
                      "met": cpu_ratio <= 1.03}
    print(f"\n| command | base {args.base}: wall / CPU (s) | this checkout: wall / CPU (s) | wall ratio | CPU ratio "
          "| target: CPU ratio <= 1.03 |\n|---|---|---|---|---|---|")
    for name, r in rows.items():
        print(f"| {name} | {r['base_wall']:.2f} / {r['base_cpu']:.2f} | {r['new_wall']:.2f} / {r['new_cpu']:.2f} | "
              f"{r['wall_ratio']:.3f} | {r['cpu_ratio']:.3f} | {'MET' if r['met'] else 'NOT MET'} |")
    if args.json:
        args.json.write_text(json.dumps({"base": args.base, "repeats": args.repeats, "epochs": args.epochs,
                                         "commands": rows, "command": " ".join(sys.argv)}, indent=2) + "\n")


if __name__ == "__main__":
    main()
