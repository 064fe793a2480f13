"""Hyperparameter search over the fine-tuning job (Optuna TPE, median pruning per epoch),
stored in <output_dir>/study.db: rerun the same command to add trials to the same study, or
start a second process on the same folder to share it. --storage puts the study in PostgreSQL
(postgresql://...) or a journal file on a shared filesystem (journal:PATH) so that processes
on several machines share it (docs/scale.md).

Every training flag of `finetune` (--epoch, --batch_size, --config, --prompt_type, ...) sets
what the space does not vary. The objective is validation macro-F1 averaged over --folds;
the test split is never read during the search. --refit then runs the best setting on all
folds and reports the test metrics once.

The study records the settings its trials are measured with (every flag that changes a
trial's value, the space, the folds, the data's and checkpoint's fingerprints); adding trials
or refitting with other ones is refused, naming each difference (exit 2). best_command.txt is
the `geneformer-peft finetune` command that reproduces the best trial's value. Each trial
sets torch's thread count as `finetune` does (--num_threads, else the free cores). Ctrl-C
records the running trial as failed and stops with one line (exit 130); rerun to go on.

Example (the shipped example):
  geneformer-peft search --dataset_name synthetic --data_path example_py/data \\
      --model_path Pretrain_ckpts/geneformer-tiny-example --space docs/search_space_example.json \\
      --n_trials 20 --folds 0 --epoch 5 --output_dir save/search --refit
"""
from __future__ import annotations

import argparse
import logging
from pathlib import Path

from geneformer_peft.commands import finetune
from geneformer_peft.commands._common import OUTPUT_FOLDER, SEED, file_path, non_negative_int, positive_float

logger = logging.getLogger(__name__)

HELP = "Hyperparameter search (Optuna TPE + median pruning), resumable from SQLite; --refit on all folds"


def add_arguments(parser: argparse.ArgumentParser, defaults: dict | None = None) -> None:
    finetune.add_arguments(parser, defaults)
    for action in parser._actions:  # the study folder is --output_dir; refit runs go below it
        if "--output_path" in action.option_strings:
            action.help = argparse.SUPPRESS
        elif "--num_threads" in action.option_strings:
            action.help = ("CPU threads of torch in every trial (default: chosen before each trial, one per core not "
                           "kept busy by other processes, as finetune does; logged in search.log as 'trial N: torch "
                           "threads: K (reason)'). best_command.txt names the best trial's count.")
        elif "--overwrite" in action.option_strings:
            action.help = ("--refit: redo refit folds that finished earlier (the study itself is never overwritten; "
                           "a new study needs another --output_dir).")
    p = parser.add_argument
    p("--space", type=file_path("a JSON file of parameter ranges"), required=True,
      help="JSON search space {parameter: {low, high[, log, step, type]} | {choices: [...]} | value}; "
           "see docs/recipes.md.")
    p("--output_dir", type=OUTPUT_FOLDER, required=True,
      help="Study folder: study.db, trials.csv, best_config.json, plots, refit/.")
    p("--n_trials", type=non_negative_int, default=10,
      help="Trials this process adds to the study (%(default)s); processes sharing a study add theirs up. 0: run "
           "none, write this folder's outputs from the study as it stands.")
    p("--timeout", type=positive_float, default=None, help="Stop starting new trials after this many seconds.")
    p("--study_name", default="search", help="Study name inside the storage (%(default)s).")
    p("--storage", default=None, metavar="URL|journal:PATH",
      help="Where the study lives, for several processes or machines sharing it (default: <output_dir>/study.db): "
           "an RDB URL (postgresql://user:password@host:5432/dbname; needs the 'postgres' extra) or journal:PATH (a "
           "journal file on a filesystem every machine mounts). See docs/scale.md.")
    p("--no_pruning", action="store_true", help="Run every trial to the end (no median pruner).")
    p("--pruner_startup_trials", type=non_negative_int, default=2,
      help="Trials that finish before the median pruner stops any (%(default)s).")
    p("--pruner_warmup_epochs", type=non_negative_int, default=0,
      help="Epochs a trial runs before it may be pruned (%(default)s).")
    p("--sampler_seed", type=SEED, default=None,
      help="Seed of the TPE sampler: the same seed and study size draw the same parameters (default: --seed "
           "plus a per-process number, so that processes sharing a study draw differently).")
    p("--refit", action="store_true",
      help="After the search, train the best setting on all folds and report its test metrics.")


def run(args: argparse.Namespace) -> int:
    from geneformer_peft.files import check_path
    from geneformer_peft.training.search import (SearchSettings, check_storage, collect_outputs, load_search_space,
                                                 refit_best, run_search)

    if args.n_trials is not None and args.n_trials < 0:
        raise ValueError(f"--n_trials {args.n_trials}: expected an integer >= 0")
    check_path(args.data_path, "folder", f"the folder holding {args.dataset_name}/<i>/", flag="--data_path")
    if args.storage is not None:
        check_storage(args.storage)
    opts = finetune.options_from_args(args)
    space = load_search_space(args.space, base_training=opts.training)
    settings = SearchSettings(run=opts, space=space, output_dir=args.output_dir, n_trials=args.n_trials,
                              timeout=args.timeout, study_name=args.study_name, pruning=not args.no_pruning,
                              pruner_startup_trials=args.pruner_startup_trials,
                              pruner_warmup_epochs=args.pruner_warmup_epochs, sampler_seed=args.sampler_seed,
                              storage=args.storage)
    if args.n_trials or args.timeout:
        study = run_search(settings)
        logger.info("study %r: %d trials in %s", args.study_name, len(study.trials), settings.storage_name)
    elif not args.refit:
        collect_outputs(settings)
    if args.refit:
        summary = refit_best(settings)
        if not logging.getLogger("geneformer_peft").isEnabledFor(logging.INFO):
            print(f"Refit over folds {summary['fold_ids']} ({summary['run_dir']}):\n{summary['table']}")
    return 0
