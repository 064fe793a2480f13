"""``geneformer-peft tokenize --encoding binned``: scBERT's binned encoding (options and run).

Kept beside :mod:`geneformer_peft.commands.tokenize`, which adds these options and hands a
binned run to :func:`run`.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from geneformer_peft.commands._common import file_path, guarded, int_in, non_negative_int
from geneformer_peft.errors import DataError

logger = logging.getLogger(__name__)

ENCODINGS = ("rank_value", "binned", "cellfm")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add ``--encoding`` and the binned encoding's options."""
    group = parser.add_argument_group("encoding (default: Geneformer's rank value; binned: scBERT's; cellfm: CellFM's)")
    group.add_argument("--encoding", choices=ENCODINGS, default="rank_value",
                       help="rank_value (Geneformer), binned (scBERT: one position per panel gene, token = "
                            "binned log2 expression) or cellfm (CellFM: expressed genes with their log1p values).")
    group.add_argument("--gene_panel", type=file_path("a gene panel file (.txt or .npy)"), metavar="PANEL.txt|.npy",
                       help="binned: the model's genes in position order (one name a line, or a .npy of names); "
                            "matched against --gene_id_column.")
    group.add_argument("--gene2vec", type=file_path("a .npy file of gene vectors"), metavar="FILE.npy",
                       help="binned: gene vectors (panel genes x dim, panel order), written beside the dataset as "
                            "gene2vec.npy for models built on it; without it they get a fixed random embedding.")
    group.add_argument("--bin_num", type=int_in(1, 254), default=5, help="binned: highest bin (tokens 0..bin_num; scBERT: 5).")
    group.add_argument("--min_genes", type=non_negative_int, default=200,
                       help="binned: drop cells with fewer expressed panel genes (scBERT: 200).")


def refuse_binned_options(args: argparse.Namespace, *, encoding: str = "rank_value") -> None:
    """A rank-value (or CellFM) run given binned-only options: say so rather than ignore them."""
    given = [flag for flag, value in (("--gene_panel", args.gene_panel), ("--gene2vec", args.gene2vec))
             if value is not None]
    if given:
        used = "the rank value encoding" if encoding == "rank_value" else f"--encoding {encoding}"
        raise DataError(f"{', '.join(given)} apply to --encoding binned; this run uses {used} "
                        "(add --encoding binned)")


def run(args: argparse.Namespace) -> int:
    """Tokenize ``args.input`` with the binned encoding into ``args.output``."""
    from geneformer_peft.commands.tokenize import TOKENIZE_INPUTS, cell_options
    from geneformer_peft.data.binned import read_gene2vec, read_gene_panel, tokenize_binned, write_panel_files

    from geneformer_peft.commands._cellfm_tokenize import refuse_cellfm_options

    refuse_cellfm_options(args)
    if args.gene_panel is None:
        raise DataError("--encoding binned needs --gene_panel PANEL.txt|.npy (the model's genes in position order)")
    given = [flag for flag, value in (("--token_dictionary", args.token_dictionary),
                                      ("--gene_median_dictionary", args.gene_median_dictionary),
                                      ("--build_vocab", args.build_vocab)) if value is not None]
    if given:
        raise DataError(f"{', '.join(given)} apply to the rank value encoding; --encoding binned reads "
                        "--gene_panel instead")
    with guarded(args, "tokenize", inputs=TOKENIZE_INPUTS) as tmp:
        panel = read_gene_panel(args.gene_panel)
        gene2vec = None
        if args.gene2vec is not None:
            gene2vec = read_gene2vec(args.gene2vec, n_genes=len(panel))
        else:
            logger.warning("no --gene2vec: a scBERT model built for this dataset gets a fixed random positional "
                           "embedding instead of gene2vec vectors")
        dataset, stats = tokenize_binned(
            args.input,
            gene_panel=panel,
            bin_num=args.bin_num,
            min_genes=args.min_genes,
            return_stats=True,
            **cell_options(args),
        )
        stats.gene2vec = None if gene2vec is None else "gene2vec.npy"
        dataset.info.description = stats.to_json()
        dataset.save_to_disk(str(tmp))
        write_panel_files(tmp, panel, gene2vec)
    logger.info("saved %d binned cells (%d positions each) to %s", stats.n_cells_kept, stats.gene_num + 1,
                args.output)
    return 0
