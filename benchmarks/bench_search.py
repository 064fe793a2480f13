"""Pruned vs unpruned hyperparameter search on the shipped example (1 fold): how long the
median-pruned search takes to reach a trial within 0.01 validation macro-F1 of the unpruned
search's best, against the unpruned search's whole wall time (target: at most half).

Both searches run the same space (``docs/search_space_example.json``), the same TPE sampler
seed, the same number of trials and epochs, one after the other in this process, on fold 0
of ``example_py/data/synthetic`` with ``Pretrain_ckpts/geneformer-tiny-example`` and LoRA (the
space searches ``lora_r`` and ``lora_alpha``), whatever the checkpoint's own method. Times are wall-clock from each study's first trial start to the finish of
the trial in question, read from the studies' trial records.

    python benchmarks/bench_search.py --json out.json [--quick] [--trials N] [--epochs E]

``--quick``: 6 trials of 3 epochs, cells cut to their first 128 genes (a few minutes on a
shared 2-core CPU); default: 10 trials of 4 epochs at the example's 256 genes.
"""
from __future__ import annotations

import json
import logging
import tempfile
import time
from pathlib import Path

import torch

from common import REPO, base_parser, machine_info, resolve, write_json


def run_one(out: Path, *, pruning: bool, trials: int, epochs: int, max_length: int | None, device: str,
            seed: int) -> dict:
    from geneformer_peft.training.arguments import TrainingArguments
    from geneformer_peft.training.cross_validation import RunOptions
    from geneformer_peft.training.search import SearchSettings, load_search_space, run_search

    training = TrainingArguments(epochs=epochs, batch_size=32, lr=1e-2, max_length=max_length, device=device,
                                 progress=False, early_stopping_patience=0)
    opts = RunOptions(dataset_name="synthetic", data_path=REPO / "example_py" / "data", output_path=out,
                      model_path=REPO / "Pretrain_ckpts" / "geneformer-tiny-example", prompt_type="lora", folds=[0],
                      training=training)
    space = load_search_space(REPO / "docs" / "search_space_example.json", base_training=training)
    settings = SearchSettings(run=opts, space=space, output_dir=out, n_trials=trials, pruning=pruning,
                              pruner_startup_trials=2, sampler_seed=seed)
    t0 = time.perf_counter()
    study = run_search(settings)
    wall = time.perf_counter() - t0
    start = min(t.datetime_start for t in study.trials)
    rows = [{"number": t.number, "state": t.state.name, "value": t.value,
             "finished_s": (t.datetime_complete - start).total_seconds(),
             "epochs": len(t.intermediate_values)} for t in study.trials]
    return {"wall_s": wall, "trials": rows, "best": max((r["value"] for r in rows if r["state"] == "COMPLETE"),
                                                         default=float("nan"))}


def time_to(rows: list[dict], target: float) -> float | None:
    hits = [r["finished_s"] for r in rows if r["state"] == "COMPLETE" and r["value"] >= target]
    return min(hits) if hits else None


def main(argv=None) -> int:
    p = base_parser(__doc__)
    p.add_argument("--trials", type=int, default=None)
    p.add_argument("--epochs", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    device = resolve(args.device)
    torch.set_num_threads(1 if device.type == "cpu" else torch.get_num_threads())
    logging.basicConfig(level=logging.WARNING)
    trials = args.trials or (6 if args.quick else 10)
    epochs = args.epochs or (3 if args.quick else 4)
    max_length = 128 if args.quick else None
    with tempfile.TemporaryDirectory(prefix="gf_search_") as tmp:
        unpruned = run_one(Path(tmp) / "unpruned", pruning=False, trials=trials, epochs=epochs,
                           max_length=max_length, device=str(device), seed=args.seed)
        pruned = run_one(Path(tmp) / "pruned", pruning=True, trials=trials, epochs=epochs, max_length=max_length,
                         device=str(device), seed=args.seed)
    target = unpruned["best"] - 0.01
    reach_pruned = time_to(pruned["trials"], target)
    reach_unpruned = time_to(unpruned["trials"], target)
    ratio = reach_pruned / unpruned["wall_s"] if reach_pruned is not None else None
    result = {"machine": machine_info(device), "trials": trials, "epochs": epochs, "max_length": max_length or 256,
              "unpruned": unpruned, "pruned": pruned, "target_val_macro_f1": target,
              "pruned_seconds_to_target": reach_pruned, "unpruned_seconds_to_target": reach_unpruned,
              "unpruned_wall_s": unpruned["wall_s"], "pruned_wall_s": pruned["wall_s"],
              "ratio_pruned_to_target_over_unpruned_wall": ratio,
              "target_met": ratio is not None and ratio <= 0.5,
              "pruned_trials": sum(r["state"] == "PRUNED" for r in pruned["trials"])}
    write_json(args.json, result)
    print(json.dumps({k: v for k, v in result.items() if k not in ("machine",)}, indent=1, default=float))
    return 0


def render_section(r: dict, targets: list) -> list[str]:
    """The section of ``docs/benchmarks.md`` (called by ``run_all.py``)."""
    md = ["## Hyperparameter search: median pruning vs none (shipped example, fold 0)", "",
          (f"{r['trials']} trials of {r['epochs']} epochs each, cells cut to {r['max_length']} genes, same space "
           "(docs/search_space_example.json) and TPE seed; target: a completed trial within 0.01 validation "
           f"macro-F1 of the unpruned best ({r['target_val_macro_f1'] + 0.01:.4f})."), "",
          "| search | wall s | best val macro-F1 | s to target | pruned trials |", "|---|---:|---:|---:|---:|"]
    for name in ("unpruned", "pruned"):
        reach = r[f"{name}_seconds_to_target"]
        md.append(f"| {name} | {r[name]['wall_s']:.1f} | {r[name]['best']:.4f} | "
                  f"{'not reached' if reach is None else f'{reach:.1f}'} | "
                  f"{sum(t['state'] == 'PRUNED' for t in r[name]['trials'])} |")
    ratio = r["ratio_pruned_to_target_over_unpruned_wall"]
    targets.append(("Pruned search reaches the unpruned best - 0.01 in <= 0.5x the unpruned wall time",
                    r["target_met"], "not reached" if ratio is None else f"{ratio:.2f}x"))
    return md + [""]


if __name__ == "__main__":
    raise SystemExit(main())
