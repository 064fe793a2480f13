"""Macro-F1 of every PEFT method on the shipped example, from the pretrained tiny
checkpoint and from the same architecture randomly initialised (does pretraining help?).

    python benchmarks/example_methods.py [--folds 0,1,2,3,4] [--epochs 10] [--out docs/example_methods.md]
    python benchmarks/example_methods.py --quick     # one fold, 2 epochs, LoRA only, to /tmp

Every run also fits the job's logistic-regression baseline on the same folds (docs/baseline.md):
the table gains its row and, per method, the paired difference model minus baseline.

Runs the main job (geneformer_peft.training.cross_validation) once per method and initialisation,
same seed, data, epochs and learning rate, and writes a markdown table and JSON.
"""
import argparse
import json
import logging
import platform
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from geneformer_peft.training.cross_validation import RunOptions, run_cross_validation  # noqa: E402
from geneformer_peft.training.arguments import TrainingArguments  # noqa: E402

# every PEFT method runs at --lr (1e-2 by default): the LoRA rate suits ia3 (scales start at 1)
# and dora (LoRA plus a magnitude) alike
METHODS = ["", "lora", "prefix_prompt", "Gene_token_prompt", "encoder_prompt", "Gene_token_prompt,lora",
           "ia3", "dora"]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--folds", default="0,1,2,3,4")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--lr", type=float, default=1e-2, help="learning rate of the PEFT methods")
    parser.add_argument("--lr_full", type=float, default=1e-3, help="learning rate of full fine-tuning")
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--methods", default=None, help="';'-separated prompt types (default: all eight)")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "example_methods.md")
    parser.add_argument("--quick", action="store_true", help="fold 0, 2 epochs, LoRA only; writes under /tmp")
    args = parser.parse_args(argv)
    if args.quick:
        args.folds, args.epochs, args.methods = "0", 2, "lora"
        args.out = Path(tempfile.gettempdir()) / "example_methods_quick.md"
    logging.basicConfig(level=logging.WARNING)
    folds = [int(f) for f in args.folds.split(",")]
    methods = args.methods.split(";") if args.methods is not None else METHODS
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for method in methods:
            for random_init in (False, True):
                opts = RunOptions(
                    dataset_name="synthetic", data_path=ROOT / "example_py" / "data", output_path=Path(tmp),
                    model_path=ROOT / "Pretrain_ckpts" / "geneformer-tiny-example", prompt_type=method,
                    out_prefix="random_" if random_init else "pretrained_", folds=folds, random_init=random_init,
                    training=TrainingArguments(epochs=args.epochs, lr=args.lr if method else args.lr_full,
                                               batch_size=args.batch_size,
                                               progress=False))
                t0 = time.perf_counter()
                summary = run_cross_validation(opts)
                m = summary["metrics"]
                rows.append({"method": method or "full fine-tuning", "init": "random" if random_init else "pretrained",
                             "macro_f1_mean": m["macro_f1"]["mean"], "macro_f1_std": m["macro_f1"]["std"],
                             "accuracy_mean": m["accuracy"]["mean"],
                             "trainable_percent": m["trainable_percent"]["mean"],
                             "seconds": time.perf_counter() - t0})
                b, c = summary["baseline"]["metrics"], summary["comparison"]
                rows[-1].update({"baseline_macro_f1_mean": b["macro_f1"]["mean"],
                                 "baseline_macro_f1_std": b["macro_f1"]["std"],
                                 "baseline_accuracy_mean": b["accuracy"]["mean"],
                                 "diff_macro_f1_mean": c["metrics"]["macro_f1"]["diff_mean"],
                                 "diff_macro_f1_std": c["metrics"]["macro_f1"]["diff_std"],
                                 "model_better_folds": c["metrics"]["macro_f1"]["model_better"],
                                 "comparison": c["sentence"]})
                print(f"{rows[-1]['method']:24s} {rows[-1]['init']:10s} macro-F1 {rows[-1]['macro_f1_mean']:.3f} "
                      f"± {rows[-1]['macro_f1_std']:.3f}  ({rows[-1]['seconds']:.0f} s)", flush=True)
    command = "python benchmarks/example_methods.py " + " ".join(argv if argv is not None else sys.argv[1:])
    lines = ["# PEFT methods on the shipped example", "",
             f"Command: `{command.strip()}`; folds {folds}, {args.epochs} epochs, lr {args.lr} "
             f"(full fine-tuning {args.lr_full}), "
             f"batch {args.batch_size}, seed 0; {platform.processor() or platform.machine()}, CPU.", "",
             "| method | trainable % | macro-F1 pretrained | minus baseline (paired) | macro-F1 random init "
             "| minus baseline (paired) | accuracy pretrained |",
             "|---|---|---|---|---|---|---|"]
    by = {(r["method"], r["init"]): r for r in rows}
    n = len(folds)

    def paired(row):
        return (f"{row['diff_macro_f1_mean']:+.3f} ± {row['diff_macro_f1_std']:.3f} "
                f"(better in {row['model_better_folds']}/{n})")

    for method in dict.fromkeys(r["method"] for r in rows):
        p, r = by[(method, "pretrained")], by[(method, "random")]
        lines.append(f"| {method} | {p['trainable_percent']:.2f} | {p['macro_f1_mean']:.3f} ± {p['macro_f1_std']:.3f} "
                     f"| {paired(p)} | {r['macro_f1_mean']:.3f} ± {r['macro_f1_std']:.3f} | {paired(r)} "
                     f"| {p['accuracy_mean']:.3f} |")
    b = rows[0]  # the baseline does not depend on the method: the same folds, seed and class weights
    lines.append(f"| logistic regression (baseline) | - | {b['baseline_macro_f1_mean']:.3f} ± "
                 f"{b['baseline_macro_f1_std']:.3f} | 0 | (same) | 0 | {b['baseline_accuracy_mean']:.3f} |")
    lines += ["", "Paired comparison (macro-F1, pretrained):", ""]
    lines += [f"- {r['comparison']}" for r in rows if r["init"] == "pretrained"]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines) + "\n", encoding="utf-8")
    args.out.with_suffix(".json").write_text(json.dumps(rows, indent=2), encoding="utf-8")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
