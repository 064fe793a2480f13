"""What the compatibility report costs a fold of the shipped example.

Times ``geneformer_peft.checks.check_compatibility`` on fold 0 of the example (its three splits,
the tiny checkpoint, labels; median of repeats, after one warm call) and one whole fold of the
example's default run (``run_cross_validation`` of fold 0 with the example script's settings,
checks included) in the same process, and reports the share. Target: the report adds no more
than 5% to a fold's time.

    python benchmarks/bench_checks.py [--repeats 7] [--epochs 20] [--json out.json]
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "example_py"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--epochs", type=int, default=None, help="Epochs of the fold (default: the example's).")
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--device", default="cpu", help=argparse.SUPPRESS)
    parser.add_argument("--workdir", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--quick", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()

    import datasets

    datasets.disable_progress_bars()
    from cell_classification_prompt_fold import EXAMPLE_DEFAULTS
    from geneformer_peft.checks import check_compatibility
    from geneformer_peft.commands.finetune import add_arguments, options_from_args
    from geneformer_peft.data.dataset_io import load_saved_dataset
    from geneformer_peft.data.folds import SPLITS, fold_paths
    from geneformer_peft.training.cross_validation import run_cross_validation

    model = REPO / EXAMPLE_DEFAULTS["model_path"]
    data = REPO / EXAMPLE_DEFAULTS["data_path"]
    paths = fold_paths(data, EXAMPLE_DEFAULTS["dataset_name"], 0)
    splits = {s: load_saved_dataset(paths[s]) for s in SPLITS}
    check_compatibility(model, splits, label_column="cell_type")  # warm: imports, page cache
    times = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        report = check_compatibility(model, splits, label_column="cell_type")
        times.append(time.perf_counter() - start)
    assert report.ok, report.text()
    check_seconds = statistics.median(times)

    with tempfile.TemporaryDirectory() as tmp:
        parser_ft = argparse.ArgumentParser()
        add_arguments(parser_ft, defaults=dict(EXAMPLE_DEFAULTS))
        argv = ["--folds", "0", "--output_path", tmp, "--no_progress"]
        argv += ["--epoch", str(args.epochs)] if args.epochs else []
        opts = options_from_args(parser_ft.parse_args(argv))
        start = time.perf_counter()
        run_cross_validation(opts)
        fold_seconds = time.perf_counter() - start
    result = {"check_seconds_median": check_seconds, "check_seconds_all": times, "fold_seconds": fold_seconds,
              "share": check_seconds / fold_seconds, "target_share": 0.05,
              "met": check_seconds / fold_seconds <= 0.05, "epochs": args.epochs or EXAMPLE_DEFAULTS.get("epochs"),
              "command": " ".join(sys.argv)}
    print(f"check_compatibility on fold 0: {check_seconds:.3f} s (median of {args.repeats}); one fold of the "
          f"example: {fold_seconds:.1f} s; share {result['share']:.2%} (target <= 5%: "
          f"{'MET' if result['met'] else 'NOT MET'})")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
