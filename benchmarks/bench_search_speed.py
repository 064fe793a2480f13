"""Search trials' training speed against a fine-tuning job of the same setting (issue 25:
trials had run at 21-32 cells/s where the refit of the same setting ran at 90-100).

On fold 0 of the shipped example (``example_py/data/synthetic``,
``Pretrain_ckpts/geneformer-tiny-example``, LoRA), each repeat runs, as a user would, one
``geneformer-peft finetune`` and one ``geneformer-peft search`` of ``--trials`` trials over a
one-point space (every searched parameter has one choice: the finetune's ``--lr``, and
the checkpoint's ``lora_r``), each in a fresh process with the same ``--num_threads``, the two alternating
which goes first. Both train the same cells with the same seed (the trials' validation
macro-F1 equals the finetune's best epoch's, checked).

Training speed, for both read from what the run records (the trainer's clock around its
training passes, so validation, test prediction and set-up are excluded): cells seen in
training (cells x epochs) / training seconds: finetune's ``metrics.json``
``train_cells_per_second``, each trial's ``train_cells_per_second`` (``trials.csv``, user
attribute). Reported: the median of each, their ratio (target >= 0.9), the ratio within each
repeat (its trials' median over its finetune: neighbours in time share the machine's load), and
what a trial costs
beyond its training passes (Optuna's trial duration minus training seconds: model building,
the per-epoch validation, the thread policy) next to the time between trials.

    python benchmarks/bench_search_speed.py --json out.json [--quick] [--trials 3] [--epochs 2]
        [--repeats 4] [--num_threads 1]

``--quick``: 1 repeat of 2 trials of 1 epoch, cells cut to 64 genes (a smoke run, about a
minute). ``--num_threads 0`` leaves both to the thread policy (the free cores; noisy on a shared
machine).
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

from common import REPO, base_parser, machine_info, resolve, write_json

TARGET = 0.9


def _env() -> dict:
    env = dict(os.environ, HF_DATASETS_DISABLE_PROGRESS_BARS="1", TRANSFORMERS_VERBOSITY="error",
               PYTHONWARNINGS="ignore")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    return env


def _cli(argv: list[str]) -> float:
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "geneformer_peft.cli", *argv], cwd=REPO, env=_env(),
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"geneformer-peft {argv[0]} exited {proc.returncode}:\n{proc.stderr[-3000:]}")
    return time.perf_counter() - t0


def common_flags(args) -> list[str]:
    flags = ["--dataset_name", args.dataset_name, "--data_path", str(args.data_path), "--model_path",
             str(args.model_path), "--prompt_type", "lora", "--folds", "0", "--epoch", str(args.epochs), "--lr",
             str(args.lr), "--device", args.device, "--no_progress", "--seed", "0"]
    if args.max_length:
        flags += ["--max_length", str(args.max_length)]
    if args.num_threads:
        flags += ["--num_threads", str(args.num_threads)]
    return flags


def run_finetune(args, out: Path) -> dict:
    wall = _cli(["finetune", *common_flags(args), "--output_path", str(out), "--baselines", "none"])
    metrics = json.loads(next(out.rglob("0/metrics.json")).read_text())
    history = json.loads(next(out.rglob("0/history.json")).read_text())
    return {"wall_s": wall, "train_cells_per_second": metrics["train_cells_per_second"],
            "train_seconds": metrics["train_seconds"], "best_val_macro_f1": max(r["val_macro_f1"] for r in history)}


def run_search(args, out: Path, space: Path) -> dict:
    import pandas as pd

    wall = _cli(["search", *common_flags(args), "--space", str(space), "--output_dir", str(out), "--n_trials",
                 str(args.trials), "--no_pruning"])
    trials = pd.read_csv(out / "trials.csv")
    starts = pd.to_datetime(trials["datetime_start"])
    ends = pd.to_datetime(trials["datetime_complete"])
    gaps = [(b - a).total_seconds() for a, b in zip(ends[:-1], starts[1:])]
    rows = []
    for _, t in trials.iterrows():
        speed = float(t["user_attrs_train_cells_per_second"])
        rows.append({"number": int(t["number"]), "state": t["state"], "value": float(t["value"]),
                     "seconds": float(t["seconds"]), "train_seconds": float(t["user_attrs_train_seconds"]),
                     "train_cells_per_second": speed,
                     "threads": int(t["user_attrs_torch_threads"])})
    return {"wall_s": wall, "trials": rows, "gaps_between_trials_s": gaps}


def main(argv=None) -> int:
    p = base_parser(__doc__)
    p.add_argument("--trials", type=int, default=None, help="trials per search (default 3; --quick 2)")
    p.add_argument("--epochs", type=int, default=None, help="epochs (default 2; --quick 1)")
    p.add_argument("--repeats", type=int, default=None, help="finetune + search pairs (default 4; --quick 1)")
    p.add_argument("--num_threads", type=int, default=1, help="torch threads of both (0: the thread policy)")
    p.add_argument("--lr", type=float, default=0.01)
    p.add_argument("--max_length", type=int, default=None)
    p.add_argument("--dataset_name", default="synthetic")
    p.add_argument("--data_path", type=Path, default=REPO / "example_py" / "data")
    p.add_argument("--model_path", type=Path, default=REPO / "Pretrain_ckpts" / "geneformer-tiny-example")
    args = p.parse_args(argv)
    # the space's lora_r is the checkpoint's, which finetune (no --lora_r flag) trains with
    args.lora_r = json.loads((args.model_path / "config.json").read_text()).get("lora_r", 8)
    args.trials = args.trials or (2 if args.quick else 3)
    args.epochs = args.epochs or (1 if args.quick else 2)
    args.repeats = args.repeats or (1 if args.quick else 4)
    if args.quick and args.max_length is None:
        args.max_length = 64
    device = resolve(args.device)
    args.device = str(device)
    load_start = list(os.getloadavg())
    finetunes, searches = [], []
    with tempfile.TemporaryDirectory(prefix="gf_search_speed_") as tmp:
        space = Path(tmp) / "space.json"
        space.write_text(json.dumps({"lr": {"choices": [args.lr]}, "lora_r": {"choices": [args.lora_r]}}))
        for repeat in range(args.repeats):
            order = ("finetune", "search") if repeat % 2 == 0 else ("search", "finetune")
            for name in order:
                out = Path(tmp) / f"{name}{repeat}"
                if name == "finetune":
                    finetunes.append(run_finetune(args, out))
                    print(f"finetune: {finetunes[-1]['train_cells_per_second']:.1f} cells/s", flush=True)
                else:
                    searches.append(run_search(args, out, space))
                    print("search trials: " + ", ".join(f"{t['train_cells_per_second']:.1f}"
                                                        for t in searches[-1]["trials"]) + " cells/s", flush=True)
    trials = [t for s in searches for t in s["trials"]]
    finetune_speed = statistics.median(f["train_cells_per_second"] for f in finetunes)
    trial_speed = statistics.median(t["train_cells_per_second"] for t in trials)
    finetune_train_s = statistics.median(f["train_seconds"] for f in finetunes)
    overhead = [t["seconds"] - t["train_seconds"] for t in trials]
    paired = [statistics.median(t["train_cells_per_second"] for t in s["trials"]) / f["train_cells_per_second"]
              for f, s in zip(finetunes, searches)]
    values = {round(t["value"], 6) for t in trials} | {round(f["best_val_macro_f1"], 6) for f in finetunes}
    result = {"machine": machine_info(device), "device": args.device, "trials": args.trials, "epochs": args.epochs,
              "repeats": args.repeats, "num_threads": args.num_threads or "policy", "lr": args.lr,
              "lora_r": args.lora_r, "max_length": args.max_length or "checkpoint's",
              "finetunes": finetunes, "searches": searches,
              "finetune_train_cells_per_second": finetune_speed, "trial_train_cells_per_second": trial_speed,
              "ratio": trial_speed / finetune_speed, "target_met": trial_speed / finetune_speed >= TARGET,
              "paired_ratios": paired, "median_paired_ratio": statistics.median(paired),
              "finetune_train_seconds": finetune_train_s,
              "trial_seconds_beyond_training": statistics.median(overhead),
              "gap_between_trials_s": statistics.median([g for s in searches for g in s["gaps_between_trials_s"]]
                                                        or [float("nan")]),
              "same_value": len(values) == 1,
              "loadavg_at_start": load_start, "loadavg_at_end": list(os.getloadavg())}
    write_json(args.json, result)
    print(json.dumps({k: v for k, v in result.items() if k not in ("machine", "finetunes", "searches")}, indent=1))
    return 0


def render_section(r: dict, targets: list) -> list[str]:
    """The section of ``docs/benchmarks.md`` (called by ``run_all.py``)."""
    finetunes = ", ".join(f"{f['train_cells_per_second']:.1f}" for f in r["finetunes"])
    trials = ", ".join(f"{t['train_cells_per_second']:.1f}" for s in r["searches"] for t in s["trials"])
    length = (f"cells cut to {r['max_length']} genes" if isinstance(r["max_length"], int)
              else "cells at their full length")
    md = ["## Search trials against finetune: training speed (shipped example, fold 0)", "",
          (f"{r['repeats']} x (one `finetune` + one `search` of {r['trials']} trials), alternating which runs first, "
           f"each in a fresh process; {r['epochs']} epochs, lr {r['lr']}, lora_r {r['lora_r']} (the search space "
           f"has one point), torch threads {r['num_threads']} in both, "
           f"{length}. "
           "Training cells/s = cells seen in training (cells x epochs) / the trainer's training seconds "
           "(validation, test and set-up excluded): finetune's metrics.json `train_cells_per_second`, each "
           "trial's `train_cells_per_second` in trials.csv. Load average "
           f"{r['loadavg_at_start'][0]:.1f} at the start, {r['loadavg_at_end'][0]:.1f} at the end; "
           f"trials' validation macro-F1 equal to finetune's: {'yes' if r['same_value'] else '**no**'}."), "",
          "| run | training cells/s (each) | median |", "|---|---|---:|",
          f"| finetune | {finetunes} | {r['finetune_train_cells_per_second']:.1f} |",
          f"| search trials | {trials} | {r['trial_train_cells_per_second']:.1f} |", "",
          (f"Ratio (trials / finetune): **{r['ratio']:.2f}x**; within each repeat: "
           f"{', '.join(f'{x:.2f}x' for x in r['paired_ratios'])} (median {r['median_paired_ratio']:.2f}x). A trial spends a median "
           f"{r['trial_seconds_beyond_training']:.2f} s beyond its training passes (model building, validation "
           f"each epoch), against {r['finetune_train_seconds']:.1f} s of training in finetune; "
           f"{r['gap_between_trials_s']:.2f} s pass between one trial's end and the next one's start (Optuna's "
           "storage, garbage collection)."), ""]
    targets.append(("Search trials >= 0.9x the training cells/s of finetune of the same setting", r["target_met"],
                    f"{r['ratio']:.2f}x"))
    return md


if __name__ == "__main__":
    raise SystemExit(main())
