"""In silico perturbation: delete, overexpress, inhibit or activate genes and measure where
the cells move.

Perturbations act on the rank value encoding: delete removes the gene's token; overexpress
moves it to the first gene position (after <cls>; an unexpressed gene is inserted there and
the cell cut back to the model's input size); inhibit / activate move it down / up by
--rank_shift x the cell's number of genes. With --combination the listed genes are perturbed
together. Genes a cell does not express are skipped for that cell (counted).

Measures (at --emb_layer; only the layers needed run): cosine similarity of the cell
embedding before and after; with --emb_mode cell_and_gene the shift of every other gene's
embedding (gene_shifts.csv); with --cell_states_to_model the shift toward the goal state
and each alternative; on a fine-tuned classifier the change of each class's probability.

Statistics: per gene against random-gene perturbations of the same cells (Mann-Whitney U,
Benjamini-Hochberg FDR): gene_stats.csv (ranked) and volcano.png. Results are written in
chunks under --output_dir/chunks; run the same command again to resume.

Example:
  geneformer-peft perturb --model_path Pretrain_ckpts/geneformer-tiny-example \\
      --input example_py/data/synthetic/0/synthetic_test0.dataset --perturb_type delete --genes all \\
      --max_ncells 20 --output_dir perturb/delete_all
"""
from __future__ import annotations

import argparse
import logging
from pathlib import Path

from geneformer_peft.commands._common import (
    CHECKPOINT,
    DATASET,
    OUTPUT_FOLDER,
    SEED,
    float_in,
    folder_path,
    non_negative_int,
    positive_int,
)

logger = logging.getLogger(__name__)

HELP = "in silico perturbation (delete / overexpress / inhibit / activate) with statistics"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    p = parser.add_argument
    p("--model_path", required=True, type=folder_path("a checkpoint, fold or PEFT-weights folder"), help="Pretrained checkpoint, fold folder, or PEFT-weights folder.")
    p("--base_model", type=CHECKPOINT, default=None, help="Base checkpoint under --model_path's peft_model.safetensors.")
    p("--input", required=True, type=DATASET, help="Tokenized cells (a saved datasets.Dataset).")
    p("--output_dir", required=True, type=OUTPUT_FOLDER, help="Folder for the results (resumable).")
    p("--perturb_type", required=True, choices=["delete", "overexpress", "inhibit", "activate"])
    p("--genes", required=True, nargs="+", help="Ensembl ids to perturb, or 'all' (every gene each cell expresses).")
    p("--combination", action="store_true", help="Perturb the listed genes together (one perturbation per cell).")
    p("--rank_shift", type=float_in(0, 1, low_open=True), default=0.25,
      help="inhibit / activate: move by this fraction of the cell's genes (%(default)s).")
    p("--token_dictionary", type=Path, default=None,
      help="Token dictionary: a .json {token: id} (token_dictionary.json), Geneformer's .pkl or a tokenizer.json "
           "(default: the one in --model_path or --base_model).")
    p("--filter", action="append", default=None, dest="filters", metavar="COLUMN=VALUE[,VALUE]",
      help='Perturb only cells with these values; repeat for several columns. A value holding a comma goes in '
           'double quotes: --filter \'cell_type="CD4+, naive T cell",B cell\'.')
    p("--cell_states_to_model", default=None, metavar="JSON",
      help='JSON (or a file): {"state_key": "cell_type", "start_state": "A", "goal_state": "B", '
           '"alt_states": ["C"]}; start-state cells are perturbed, shifts toward goal / alternatives measured.')
    p("--emb_mode", default="cell", choices=["cell", "cls", "cell_and_gene"], help="%(default)s")
    p("--emb_layer", type=int, default=-1, help="0: last layer, -1: second-to-last (default), ...")
    p("--max_ncells", type=positive_int, default=None, help="Perturb the first N selected cells.")
    p("--n_null", type=non_negative_int, default=20, help="Random-gene null perturbations per cell (%(default)s).")
    p("--min_cells", type=positive_int, default=3, help="Fewest cells for a gene's test (%(default)s).")
    p("--no_class_probabilities", action="store_true",
      help="On a classifier, skip the class-probability readout (then only the layers to --emb_layer run).")
    p("--chunk_cells", type=positive_int, default=50, help="Cells per written chunk (%(default)s).")
    p("--batch_size", type=positive_int, default=64, help="Perturbed cells per forward pass (%(default)s).")
    p("--precision", default="auto", choices=["auto", "fp32", "bf16", "fp16"],
      help="auto: bf16 on CUDA, fp32 on CPU (%(default)s).")
    p("--device", default="auto", help="auto, cpu, cuda (%(default)s).")
    p("--seed", type=SEED, default=0, help="Seed of the null draws (%(default)s).")
    p("--no_plots", action="store_true", help="Skip the volcano plot.")
    p("--allow_low_gene_overlap", action="store_true",
      help="Go on when fewer than half of the input's genes have pretrained rows in the model (default: refuse).")
    p("--allow_other_base", action="store_true",
      help="Apply the fold's PEFT weights on a --base_model other than the one it was trained on (default: refuse, "
           "comparing SHA-256 with the fold's provenance.json).")
    p("--overwrite", action="store_true", help="Discard a previous scan in --output_dir instead of resuming it.")


def run(args: argparse.Namespace) -> int:
    from geneformer_peft.analysis.perturbation import CHUNK_DIR
    from geneformer_peft.analysis.runs import run_perturb
    from geneformer_peft.training.run_lock import other_torchrun_rank, run_lock
    from geneformer_peft.training.run_safety import clean_stale_temps

    main_rank = not other_torchrun_rank()  # under torchrun rank 0 locks, cleans and reports
    with run_lock(args.output_dir, enabled=main_rank):  # one scan per folder; it resumes, so the lock is inside it
        if main_rank:
            clean_stale_temps(args.output_dir)
            clean_stale_temps(args.output_dir / CHUNK_DIR)
        out = run_perturb(args.model_path, args.input, args.output_dir, genes=args.genes,
                          perturb_type=args.perturb_type, base_model=args.base_model,
                          token_dictionary=args.token_dictionary, filters=args.filters,
                          cell_states_to_model=args.cell_states_to_model, emb_mode=args.emb_mode,
                          emb_layer=args.emb_layer, max_ncells=args.max_ncells, rank_shift=args.rank_shift,
                          combination=args.combination, n_null=args.n_null, seed=args.seed,
                          chunk_cells=args.chunk_cells, batch_size=args.batch_size, device=args.device,
                          precision=args.precision, min_cells=args.min_cells,
                          class_probabilities=not args.no_class_probabilities, plots=not args.no_plots,
                          allow_low_gene_overlap=args.allow_low_gene_overlap,
                          allow_other_base=args.allow_other_base, overwrite=args.overwrite)
    if not main_rank:
        return 0
    summary, stats = out["summary"], out["stats"]
    print(f"{summary['n_perturbations']} perturbations of {summary['n_cells']} cells "
          f"(+{summary['n_null_perturbations']} null); {summary['n_tested_genes']} genes tested, "
          f"{summary['n_fdr_below_0.05']} with FDR < 0.05 ({summary['measure']})")
    for gene in summary["absent_everywhere"]:
        print(f"note: {gene} is expressed by none of the cells ({summary['absent_action']})")
    shown = stats.head(10)
    if len(shown):
        print(shown[["rank", "gene", "n_cells", f"mean_{summary['measure']}", "effect", "p_value", "fdr"]]
              .to_string(index=False))
    for name, path in out["paths"].items():
        print(f"{name} -> {path}")
    return 0
