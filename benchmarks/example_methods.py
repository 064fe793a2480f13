"""Macro-F1 of every PEFT method on the shipped example, from the pretrained tiny
checkpoint and from the same architecture randomly initialised (does pretraining help?).

    python benchmarks/example_methods.py [--folds 0,1,2,3,4] [--epochs 20] [--jobs 2] [--out docs/example_methods.md]
    python benchmarks/example_methods.py --quick     # one fold, 2 epochs, LoRA only, to /tmp
    python benchmarks/example_methods.py --family scbert --folds 0,1,2   # the shipped tiny scBERT
    python benchmarks/example_methods.py --family cellfm --folds 0,1,2   # the shipped tiny CellFM

Every run also fits the job's logistic-regression baseline on the same folds (docs/baseline.md):
the table gains its row and, per method, the paired difference model minus baseline.

Runs the main job (geneformer_peft.training.cross_validation) once per method and initialisation,
same seed, data, epochs and learning rate, and writes a markdown table and JSON.
"""
import argparse
import json
import logging
import multiprocessing as mp
import platform
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from geneformer_peft.training.cross_validation import RunOptions, run_cross_validation  # noqa: E402
from geneformer_peft.training.arguments import TrainingArguments  # noqa: E402

# every PEFT method runs at --lr (1e-2 by default): the LoRA rate suits ia3 (scales start at 1)
# and dora (LoRA plus a magnitude) alike
METHODS = ["", "lora", "prefix_prompt", "Gene_token_prompt", "encoder_prompt", "Gene_token_prompt,lora",
           "ia3", "dora"]
#: scBERT's own recipe (train the final norm, the second-to-last layer and the head) is a
#: freezing preset of full fine-tuning, named here like a method
SCBERT_RECIPE = "scbert_recipe"
#: the methods the Performer carries (no prefix prompts), and scBERT's recipe
SCBERT_METHODS = ["", "lora", "Gene_token_prompt", "encoder_prompt", "ia3", "dora", SCBERT_RECIPE]
#: CellFM's fine-tuning recipe: full fine-tuning with the gene embedding frozen (freeze_preset
#: "cellfm"; on the example the embedding is the pretrained one, not re-initialised)
CELLFM_RECIPE = "cellfm_recipe"
#: the methods CellFM carries (no prefix prompts), and the recipe's freezing
CELLFM_METHODS = ["", "lora", "Gene_token_prompt", "encoder_prompt", "ia3", "dora", CELLFM_RECIPE]
#: the shipped example of each model family: (checkpoint, dataset name, default methods, label)
FAMILIES = {
    "geneformer": (ROOT / "Pretrain_ckpts" / "geneformer-tiny-example", "synthetic", METHODS, "Geneformer (BERT)"),
    "scbert": (ROOT / "Pretrain_ckpts" / "scbert-tiny-example", "synthetic_binned", SCBERT_METHODS, "scBERT (Performer)"),
    "cellfm": (ROOT / "Pretrain_ckpts" / "cellfm-tiny-example", "synthetic_cellfm", CELLFM_METHODS, "CellFM"),
}


def method_settings(method: str) -> tuple[str, dict, str]:
    """(prompt_type, config overrides, row name) of a method of the table."""
    if method == SCBERT_RECIPE:
        return "", {"freeze_preset": "scbert"}, "scBERT recipe (freeze_preset scbert)"
    if method == CELLFM_RECIPE:
        return "", {"freeze_preset": "cellfm"}, "CellFM recipe (freeze_preset cellfm)"
    return method, {}, method or "full fine-tuning"


def run_one(task: dict) -> dict:
    """One method and initialisation through the cross-validation job: its row of the table."""
    logging.basicConfig(level=logging.WARNING)
    prompt_type, overrides, row_name = method_settings(task["method"])
    overrides = {**task.get("overrides", {}), **overrides}
    random_init = task["random_init"]
    with tempfile.TemporaryDirectory() as tmp:
        opts = RunOptions(
            dataset_name=task["dataset_name"], data_path=ROOT / "example_py" / "data", output_path=Path(tmp),
            model_path=task["model_path"], prompt_type=prompt_type, config_overrides=overrides,
            out_prefix="random_" if random_init else "pretrained_",  # each run has its own folder
            folds=task["folds"], random_init=random_init, num_threads=task["threads"],
            training=TrainingArguments(epochs=task["epochs"], lr=task["lr"] if prompt_type else task["lr_full"],
                                       batch_size=task["batch_size"],
                                       early_stopping_patience=task["patience"],
                                       select_epoch_by=task["select_epoch_by"], progress=False))
        t0 = time.perf_counter()
        summary = run_cross_validation(opts)
    m = summary["metrics"]
    row = {"method": row_name, "init": "random" if random_init else "pretrained",
           "macro_f1_mean": m["macro_f1"]["mean"], "macro_f1_std": m["macro_f1"]["std"],
           "macro_f1_folds": m["macro_f1"]["values"], "accuracy_mean": m["accuracy"]["mean"],
           "val_macro_f1_mean": m["best_val_macro_f1"]["mean"],
           "trainable_percent": m["trainable_percent"]["mean"], "seconds": time.perf_counter() - t0}
    b, c = summary["baseline"]["metrics"], summary["comparison"]
    row.update({"baseline_macro_f1_mean": b["macro_f1"]["mean"], "baseline_macro_f1_std": b["macro_f1"]["std"],
                "baseline_accuracy_mean": b["accuracy"]["mean"],
                "diff_macro_f1_mean": c["metrics"]["macro_f1"]["diff_mean"],
                "diff_macro_f1_std": c["metrics"]["macro_f1"]["diff_std"],
                "model_better_folds": c["metrics"]["macro_f1"]["model_better"], "comparison": c["sentence"]})
    print(f"{row['method']:24s} {row['init']:10s} macro-F1 {row['macro_f1_mean']:.3f} ± {row['macro_f1_std']:.3f}  "
          f"({row['seconds']:.0f} s)", flush=True)
    return row


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--folds", default="0,1,2,3,4")
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--lr", type=float, default=1e-2, help="learning rate of the PEFT methods")
    parser.add_argument("--lr_full", type=float, default=1e-3, help="learning rate of full fine-tuning")
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--patience", type=int, default=5,
                        help="early-stopping patience in epochs, 0 = none (default 5, the job's; the example "
                             "script's is 0)")
    parser.add_argument("--select_epoch_by", choices=["macro_f1", "loss"], default="macro_f1",
                        help="validation score that picks the epoch kept (default macro_f1, the job's; the "
                             "example script's is loss)")
    parser.add_argument("--methods", default=None, help="';'-separated prompt types (default: all eight)")
    parser.add_argument("--family", choices=sorted(FAMILIES), default="geneformer",
                        help="which shipped example: the tiny Geneformer or the tiny scBERT")
    parser.add_argument("--out", type=Path, default=None,
                        help="default docs/example_methods.md (geneformer), docs/example_methods_<family>.md (others)")
    parser.add_argument("--quick", action="store_true", help="fold 0, 2 epochs, LoRA only; writes under /tmp")
    parser.add_argument("--overrides", type=json.loads, default={},
                        help='config.json keys set for every run, as JSON, e.g. \'{"classifier_pooling": "first"}\'')
    parser.add_argument("--inits", default="pretrained,random", choices=["pretrained,random", "pretrained", "random"],
                        help="which initialisations to run (a table row needs both)")
    parser.add_argument("--from_json", type=Path, default=None,
                        help="write the tables from the JSON of an earlier run (give the same other flags)")
    parser.add_argument("--jobs", type=int, default=1,
                        help="runs in parallel, one torch thread each (the thread count changes only the order "
                             "of floating-point sums)")
    args = parser.parse_args(argv)
    model_path, dataset_name, default_methods, family_label = FAMILIES[args.family]
    if args.out is None:
        args.out = ROOT / "docs" / ("example_methods.md" if args.family == "geneformer"
                                    else f"example_methods_{args.family}.md")
    if args.quick:
        args.folds, args.epochs, args.methods = "0", 2, "lora"
        args.out = Path(tempfile.gettempdir()) / "example_methods_quick.md"
    logging.basicConfig(level=logging.WARNING)
    folds = [int(f) for f in args.folds.split(",")]
    methods = args.methods.split(";") if args.methods is not None else default_methods
    inits = [{"pretrained": False, "random": True}[name] for name in args.inits.split(",")]
    tasks = [(method, random_init) for method in methods for random_init in inits]
    settings = dict(model_path=model_path, dataset_name=dataset_name, folds=folds, epochs=args.epochs, lr=args.lr,
                    lr_full=args.lr_full, batch_size=args.batch_size, patience=args.patience,
                    select_epoch_by=args.select_epoch_by, threads=1 if args.jobs > 1 else None,
                    overrides=args.overrides)
    if args.from_json is not None:  # re-render the tables of an earlier run, measuring nothing
        rows = json.loads(args.from_json.read_text(encoding="utf-8"))
    elif args.jobs > 1:
        # one torch thread per worker, so that N workers share N cores without oversubscribing them
        with ProcessPoolExecutor(max_workers=args.jobs, mp_context=mp.get_context("spawn")) as pool:
            rows = list(pool.map(run_one, [dict(settings, method=m, random_init=r) for m, r in tasks]))
    else:
        rows = [run_one(dict(settings, method=m, random_init=r)) for m, r in tasks]
    given = list(argv if argv is not None else sys.argv[1:])
    if "--from_json" in given:  # name the measuring command, not the re-rendering one
        at = given.index("--from_json")
        given = given[:at] + given[at + 2:]
    command = "python benchmarks/example_methods.py " + " ".join(given)
    lines = [f"# PEFT methods on the shipped example: {family_label}", "",
             f"Command: `{command.strip()}`; checkpoint `{model_path.relative_to(ROOT)}`, dataset "
             f"`{dataset_name}`; folds {folds}, {args.epochs} epochs, lr {args.lr} "
             f"(full fine-tuning and the recipes {args.lr_full}), "
             f"batch {args.batch_size}, early-stopping patience "
             f"{args.patience or 'none (every epoch runs)'}, epoch kept by validation "
             f"{args.select_epoch_by.replace('_', '-')}, seed 0"
             + (f", config.json keys set for every run: `{json.dumps(args.overrides)}`" if args.overrides else "")
             + f"; {platform.processor() or platform.machine()}, CPU.", "",
             "| method | trainable % | macro-F1 pretrained | minus baseline (paired) | macro-F1 random init "
             "| minus baseline (paired) | accuracy pretrained | validation macro-F1 pretrained / random |",
             "|---|---|---|---|---|---|---|---|"]
    by = {(r["method"], r["init"]): r for r in rows}
    n = len(folds)

    def paired(row):
        return (f"{row['diff_macro_f1_mean']:+.3f} ± {row['diff_macro_f1_std']:.3f} "
                f"(better in {row['model_better_folds']}/{n})")

    def cells(row):
        if row is None:
            return "not run", "", "", "-"
        return (f"{row['macro_f1_mean']:.3f} ± {row['macro_f1_std']:.3f}", paired(row), f"{row['accuracy_mean']:.3f}",
                f"{row['val_macro_f1_mean']:.3f}")

    for method in dict.fromkeys(r["method"] for r in rows):
        p, r = by.get((method, "pretrained")), by.get((method, "random"))
        share = (p or r)["trainable_percent"]
        (pf1, pdiff, pacc, pval), (rf1, rdiff, _, rval) = cells(p), cells(r)
        lines.append(f"| {method} | {share:.2f} | {pf1} | {pdiff} | {rf1} | {rdiff} | {pacc} | {pval} / {rval} |")
    b = rows[0]  # the baseline does not depend on the method: the same folds, seed and class weights
    lines.append(f"| logistic regression (baseline) | - | {b['baseline_macro_f1_mean']:.3f} ± "
                 f"{b['baseline_macro_f1_std']:.3f} | 0 | (same) | 0 | {b['baseline_accuracy_mean']:.3f} | - |")
    lines += ["", "Validation macro-F1: of the best epoch on each fold's validation split (the epoch the job "
              "restores before testing), mean over the folds; settings are compared on it, the test split "
              "is read once per run."]
    lines += ["", "Paired comparison (macro-F1, pretrained):", ""]
    lines += [f"- {r['method']}: {r['comparison']}" for r in rows if r["init"] == "pretrained"]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines) + "\n", encoding="utf-8")
    args.out.with_suffix(".json").write_text(json.dumps(rows, indent=2), encoding="utf-8")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
