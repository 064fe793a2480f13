"""Threads on a busy CPU: the example's training steps with torch's default thread count
against the run's thread policy (``geneformer_peft/training/threads.py``), each measured with
the machine as it is ("idle") and with one competing busy process started by this benchmark
(a Python busy loop, killed at the end).

Model and data: what ``example_py/cell_classification_prompt_fold.py`` trains with its
defaults (``Pretrain_ckpts/geneformer-tiny-example``, fold 0 of ``example_py/data/synthetic``,
batch 32, lr 1e-2, the class-balanced sampler and class weights), through ``FoldTrainer``'s
own loader, forward and loss; a fixed number of optimiser steps after warm-up steps.

Target: with one competing busy process on 2 cores, the policy keeps at least 0.45x the
idle cells/s (``busy_policy_vs_best_idle``: against the faster of the two idle cases, since on
a machine others load too, torch's default is itself oversubscribed "idle").

Rounds interleave the four cases (idle/default, idle/policy, busy/default, busy/policy) so
that the load of other users drifts across all of them alike; the median of the rounds is
reported. On a machine that others use too, "idle" means "without our competitor": the load
average at each measurement is recorded.

    python benchmarks/bench_threads.py --json out.json [--quick]
"""
from __future__ import annotations

import logging
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from common import REPO, base_parser, machine_info, write_json

logger = logging.getLogger("bench_threads")

BUSY_LOOP = "while True:\n    pass\n"


def build_trainer():
    from geneformer_peft.data.cells import EncodedCells
    from geneformer_peft.data.folds import label_mapping, load_fold
    from geneformer_peft.data.samplers import class_weights
    from geneformer_peft.models.loading import load_classifier, resolve_config
    from geneformer_peft.training.arguments import TrainingArguments
    from geneformer_peft.training.cross_validation import RunOptions
    from geneformer_peft.training.preflight import fold_config
    from geneformer_peft.training.trainer import FoldTrainer, set_seed
    from transformerslocal import mark_trainable

    sys.path.insert(0, str(REPO / "example_py"))
    from cell_classification_prompt_fold import EXAMPLE_DEFAULTS as D

    args = TrainingArguments(epochs=D["epochs"], batch_size=D["batch_size"], lr=D["lr"], progress=False,
                             device="cpu")
    opts = RunOptions(dataset_name=D["dataset_name"], data_path=D["data_path"], output_path=Path("unused"),
                      model_path=D["model_path"], training=args)
    set_seed(0)
    train, val, test = load_fold(opts.data_path, opts.dataset_name, 0)
    label2id, _ = label_mapping(train, val, test, opts.label_column)
    label2id = {str(k): v for k, v in label2id.items()}
    config = fold_config(resolve_config(opts.model_path), opts, label2id)
    model = load_classifier(opts.model_path, config)
    mark_trainable(model)
    cells = {name: EncodedCells.from_dataset(ds, label_column=opts.label_column,
                                             label2id={v: label2id[str(v)] for v in ds.unique(opts.label_column)},
                                             max_length=config.max_position_embeddings, name=name)
             for name, ds in (("train", train), ("val", val))}
    weights = class_weights(cells["train"].labels, config.num_labels, id2label=config.id2label)
    return FoldTrainer(model, cells["train"], cells["val"], args, class_weights=weights, device=torch.device("cpu"))


def batches(trainer):
    epoch = 0
    while True:
        epoch += 1
        trainer.sampler.set_epoch(epoch)
        yield from trainer.loader


def measure(trainer, stream, steps: int, warmup: int) -> float:
    """Cells per second over ``steps`` optimiser steps (after ``warmup`` steps)."""
    model, opt = trainer.model, trainer.optimizer
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    seen, t0 = 0, None
    for i in range(warmup + steps):
        if i == warmup:
            t0 = time.perf_counter()
        batch = next(stream)
        loss = trainer.loss(trainer.forward_logits(batch), batch["labels"])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        opt.step()
        if i >= warmup:
            seen += len(batch["labels"])
    return seen / (time.perf_counter() - t0)


def main() -> None:
    parser = base_parser(__doc__)
    parser.add_argument("--steps", type=int, default=None, help="measured steps per case (default 8 quick, 24)")
    parser.add_argument("--rounds", type=int, default=None, help="rounds of the four cases (default 1 quick, 3)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    steps = args.steps or (8 if args.quick else 24)
    rounds = args.rounds or (1 if args.quick else 3)
    from geneformer_peft.training.threads import available_cores, choose_num_threads

    default_threads = torch.get_num_threads()
    trainer = build_trainer()
    stream = batches(trainer)
    measure(trainer, stream, 2, 1)  # first-call costs out of the way
    results: dict[str, list] = {k: [] for k in ("idle_default", "idle_policy", "busy_default", "busy_policy")}
    choices: dict[str, list] = {"idle": [], "busy": []}
    loads: dict[str, list] = {k: [] for k in results}
    for r in range(rounds):
        for load in ("idle", "busy"):
            competitor = None
            if load == "busy":
                competitor = subprocess.Popen([sys.executable, "-c", BUSY_LOOP])
                time.sleep(1.0)
            try:
                torch.set_num_threads(default_threads)
                choice = choose_num_threads(current=default_threads, environ={})
                choices[load].append({"threads": choice.num_threads, "reason": choice.reason})
                for policy, n in (("default", default_threads), ("policy", choice.num_threads)):
                    torch.set_num_threads(n)
                    key = f"{load}_{policy}"
                    results[key].append(measure(trainer, stream, steps, 2))
                    loads[key].append(os.getloadavg()[0])
                    logger.info("round %d %s (%d threads): %.1f cells/s, load %.2f", r, key, n, results[key][-1],
                                loads[key][-1])
            finally:
                if competitor is not None:
                    competitor.kill()
                    competitor.wait()
    torch.set_num_threads(default_threads)
    med = {k: statistics.median(v) for k, v in results.items()}
    ratios = {
        "busy_default_vs_idle_default": med["busy_default"] / med["idle_default"],
        "busy_policy_vs_idle_default": med["busy_policy"] / med["idle_default"],
        "busy_policy_vs_idle_policy": med["busy_policy"] / med["idle_policy"],
        "busy_policy_vs_busy_default": med["busy_policy"] / med["busy_default"],
        "busy_policy_vs_best_idle": med["busy_policy"] / max(med["idle_default"], med["idle_policy"]),
    }
    target = 0.45
    out = {"bench": "threads", "machine": machine_info(torch.device("cpu")),
           "settings": {"steps": steps, "rounds": rounds, "batch_size": trainer.args.batch_size,
                        "default_threads": default_threads, "cores": available_cores()},
           "cells_per_second": results, "median_cells_per_second": med, "loadavg_1min": loads,
           "policy_choices": choices, "ratios": ratios,
           "target": {"busy_policy_vs_best_idle_at_least": target,
                      "met": ratios["busy_policy_vs_best_idle"] >= target}}
    write_json(args.json, out)
    for key, value in ratios.items():
        print(f"{key}: {value:.2f}x")


def render_section(r: dict, targets: list) -> list[str]:
    """The section of ``docs/benchmarks.md`` (called by ``run_all.py``)."""
    med, ratios, s = r["median_cells_per_second"], r["ratios"], r["settings"]
    busy_choice = r["policy_choices"]["busy"][0] if r["policy_choices"]["busy"] else {}
    md = ["## Threads on a busy CPU (the example's training steps)", "",
          (f"{s['steps']} optimiser steps per case, batch {s['batch_size']}, {s['rounds']} round(s) interleaving "
           f"the cases; {s['cores']} cores usable; torch default {s['default_threads']} threads. 'busy': one "
           "competing Python busy loop started by the benchmark. Policy under load chose "
           f"{busy_choice.get('threads')} thread(s): {busy_choice.get('reason')}."), "",
          "| case | cells/s (median) | 1-min load |", "|---|---:|---:|"]
    for key, value in med.items():
        md.append(f"| {key.replace('_', ' / ')} | {value:.1f} | {statistics.median(r['loadavg_1min'][key]):.2f} |")
    md += ["", "| ratio | x |", "|---|---:|"] + [f"| {k} | {v:.2f} |" for k, v in ratios.items()]
    targets.append(("Busy CPU (one competing process): policy keeps >= 0.45x the idle cells/s",
                    r["target"]["met"], (f"{ratios['busy_policy_vs_best_idle']:.2f}x of the best idle case (default "
                                         f"threads busy: {ratios['busy_default_vs_idle_default']:.2f}x of idle "
                                         "default)")))
    return md + [""]


if __name__ == "__main__":
    main()
