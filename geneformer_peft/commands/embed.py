"""Extract cell or gene embeddings of tokenized cells, with a quality report and plots.

--model_path is a pretrained Geneformer checkpoint, a fold folder of a fine-tuning run, or,
with --base_model, a fold's PEFT-only weights. --emb_layer counts as Geneformer's: 0 the
last layer, -1 (default) the second-to-last ... Only the layers up to it run.

Modes: cell (mean over the cell's gene tokens; padding and <cls>/<eos> excluded), cls
(the <cls> position of V2 inputs), gene (per gene, its mean contextual embedding over the
cells expressing it, with their number; --gene_per_label also per label).

Output: .h5ad (AnnData: obsm["X_geneformer"] and obs for cells; X over genes for genes;
uns["geneformer_peft"] the provenance), or .csv / .parquet tables. For cell / cls modes
with a label column: embedding_metrics.json beside the output (kNN accuracy, 5-fold, and
silhouette width per label column), a UMAP per label column (needs umap-learn) and a
heatmap of per-label mean embeddings.

Example:
  geneformer-peft embed --model_path Pretrain_ckpts/geneformer-tiny-example \\
      --input example_py/data/synthetic/0/synthetic_test0.dataset --output emb/tiny.h5ad
"""
from __future__ import annotations

import argparse
import logging
from pathlib import Path

from geneformer_peft.commands._common import CHECKPOINT, DATASET, SEED, file_path, folder_path, positive_int

logger = logging.getLogger(__name__)

HELP = "cell or gene embeddings of tokenized cells (h5ad / csv / parquet), quality report and plots"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    p = parser.add_argument
    p("--model_path", required=True, type=folder_path("a checkpoint, fold or PEFT-weights folder"), help="Pretrained checkpoint, fold folder, or PEFT-weights folder.")
    p("--base_model", type=CHECKPOINT, default=None, help="Base checkpoint under --model_path's peft_model.safetensors.")
    p("--input", required=True, type=DATASET, help="Tokenized cells (a saved datasets.Dataset).")
    p("--output", required=True, type=file_path("an output file (.h5ad, .csv or .parquet)"), help="Output file: .h5ad, .csv or .parquet.")
    p("--emb_mode", default="cell", choices=["cell", "cls", "gene"], help="What to embed (%(default)s).")
    p("--emb_layer", type=int, default=-1,
      help="0: last layer, -1: second-to-last (default), ... (Geneformer's numbering).")
    p("--label_column", action="append", default=None, dest="label_columns",
      help="Label column for metrics and plots; repeat for several (default: cell_type when present).")
    p("--gene_per_label", action="store_true", help="Gene mode: also the means per value of the first label column.")
    p("--max_ncells", type=positive_int, default=None, help="Use the first N cells of the input.")
    p("--batch_size", type=positive_int, default=64, help="Cells per batch (%(default)s).")
    p("--precision", default="auto", choices=["auto", "fp32", "bf16", "fp16"],
      help="auto: bf16 on CUDA, fp32 on CPU (%(default)s).")
    p("--device", default="auto", help="auto, cpu, cuda (%(default)s).")
    p("--token_dictionary", type=Path, default=None,
      help="Token dictionary: a .json {token: id} (token_dictionary.json), Geneformer's .pkl or a tokenizer.json "
           "(default: the one in --model_path or --base_model).")
    p("--metrics_output", type=file_path("a JSON file to write"), default=None,
      help="Quality report (default: embedding_metrics.json beside --output).")
    p("--no_plots", action="store_true", help="Skip the UMAP and heatmap plots.")
    p("--random_init", action="store_true", help="Use --model_path's architecture with random weights (a baseline).")
    p("--seed", type=SEED, default=0, help="Seed of kNN folds, UMAP and --random_init (%(default)s).")
    p("--allow_low_gene_overlap", action="store_true",
      help="Go on when fewer than half of the input's genes have pretrained rows in the model (default: refuse).")
    p("--allow_other_base", action="store_true",
      help="Apply the fold's PEFT weights on a --base_model other than the one it was trained on (default: refuse, "
           "comparing SHA-256 with the fold's provenance.json).")
    p("--overwrite", action="store_true", help="Replace an existing --output.")


def keep_foreign_report(metrics_file: Path, output: Path) -> None:
    """The quality report beside --output is shared by every embed writing into that folder: one
    written for another output is kept, renamed after that output (``<its name>.<report name>``),
    before this run's report takes its place."""
    import json
    import os

    from geneformer_peft.errors import DataError

    if not metrics_file.is_file():
        return
    try:
        owner = json.loads(metrics_file.read_text(encoding="utf-8")).get("output")
    except (OSError, ValueError, AttributeError):
        owner = None
    if owner is None or Path(owner).resolve() == Path(output).resolve():
        return
    kept = metrics_file.with_name(f"{Path(owner).name}.{metrics_file.name}")
    if kept.exists():
        raise DataError(f"{metrics_file} holds the quality report of {owner}, and {kept} exists already, so it "
                        "cannot be kept; pass --metrics_output FILE for this run's report")
    os.replace(metrics_file, kept)
    logger.info("the quality report of %s moved to %s (this run's report takes %s)", owner, kept, metrics_file)


def run(args: argparse.Namespace) -> int:
    from geneformer_peft.training.run_lock import other_torchrun_rank

    result = write_embeddings(args)
    if other_torchrun_rank():  # rank 0 writes and reports
        return 0
    print(f"embeddings -> {result['output']}")
    for column, m in result["metrics"].items():
        knn = "n/a" if m["knn_accuracy"] is None else f"{m['knn_accuracy']:.4f} ± {m['knn_accuracy_std']:.4f}"
        sil = "n/a" if m["silhouette"] is None else f"{m['silhouette']:.4f}"
        print(f"{column}: kNN accuracy ({m['n_folds']}-fold, k={m['knn_k']}) {knn}, silhouette {sil}, "
              f"{m['n_classes']} classes (majority share {m['majority_class_share']:.3f})")
    if result["metrics_file"]:
        print(f"metrics -> {result['metrics_file']}")
    for path in result["plots"]:
        print(f"plot -> {path}")
    return 0


def write_embeddings(args: argparse.Namespace, cells=None) -> dict:
    """Embed and write ``args.output`` through the command's run-safety guard (lock, the table
    whole or absent, provenance, changed settings refused) with the quality report moved in
    after it; ``gp.embed(output=...)`` writes through this too.

    Parameters
    ----------
    args : argparse.Namespace
        The command's options (``args.input``: the input's path, or ``None`` for ``cells``).
    cells : datasets.Dataset or callable, optional
        Tokenized cells in memory (or a function making them, called inside the guard), embedded
        instead of ``args.input``.

    Returns
    -------
    dict
        :func:`geneformer_peft.analysis.runs.run_embed`'s result, ``metrics_file`` its final place.
    """
    import contextlib
    import os

    from geneformer_peft.analysis.runs import METRICS_FILE, run_embed
    from geneformer_peft.commands._common import guarded

    metrics_file = args.metrics_output or args.output.parent / METRICS_FILE
    staged = None  # the report is staged beside the table and moved into place after it
    try:
        with guarded(args, "embed", inputs=("input", "model_path", "base_model", "token_dictionary"),
                     not_settings=("metrics_output",), directory=False) as tmp:
            staged = tmp.with_name(tmp.name + ".metrics.json")
            data = args.input if cells is None else cells() if callable(cells) else cells
            result = run_embed(args.model_path, data, args.output, base_model=args.base_model,
                               emb_mode=args.emb_mode, emb_layer=args.emb_layer,
                               label_columns=args.label_columns or ["cell_type"], max_ncells=args.max_ncells,
                               batch_size=args.batch_size, device=args.device, precision=args.precision,
                               token_dictionary=args.token_dictionary, gene_per_label=args.gene_per_label,
                               plots=not args.no_plots, metrics_output=staged,
                               random_init=args.random_init, seed=args.seed, write_to=tmp,
                               allow_low_gene_overlap=args.allow_low_gene_overlap,
                               allow_other_base=args.allow_other_base)
        if result["metrics_file"]:
            Path(metrics_file).parent.mkdir(parents=True, exist_ok=True)
            keep_foreign_report(Path(metrics_file), args.output)
            os.replace(staged, metrics_file)
            result["metrics_file"] = metrics_file
    finally:
        if staged is not None:
            with contextlib.suppress(FileNotFoundError):
                staged.unlink()
    return result
