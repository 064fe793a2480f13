"""``geneformer-peft tokenize --encoding cellfm``: CellFM's encoding (options and run).

Kept beside :mod:`geneformer_peft.commands.tokenize`, which adds these options and hands a
CellFM run to :func:`run`.
"""

from __future__ import annotations

import argparse
import logging

from geneformer_peft.commands._common import positive_int
from geneformer_peft.errors import DataError

logger = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the CellFM encoding's option (``--encoding`` itself is added with the binned options)."""
    parser.add_argument("--max_genes", type=positive_int, default=None,
                        help="cellfm: most expressed genes per cell, the highest log1p values kept (ties by the lower "
                             "token id); default 2048, the release's input size.")


def refuse_cellfm_options(args: argparse.Namespace) -> None:
    """Another encoding given CellFM-only options: say so rather than ignore them."""
    if args.max_genes is not None:
        raise DataError(f"--max_genes applies to --encoding cellfm; this run uses --encoding {args.encoding} "
                        "(its length option is --model_input_size)")


def run(args: argparse.Namespace) -> int:
    """Tokenize ``args.input`` with the CellFM encoding into ``args.output``."""
    from geneformer_peft.commands._binned_tokenize import refuse_binned_options
    from geneformer_peft.commands._common import guarded
    from geneformer_peft.commands.tokenize import DEFAULT_MODEL_INPUT_SIZE, TOKENIZE_INPUTS, cell_options
    from geneformer_peft.data.cellfm import MAX_GENES, tokenize_cellfm
    from geneformer_peft.data.vocab import build_vocabulary, write_dictionaries

    refuse_binned_options(args, encoding="cellfm")
    given = [flag for flag, value in (("--gene_median_dictionary", args.gene_median_dictionary),
                                      ("--model_version V2", args.model_version == "V2" or None),
                                      (f"--model_input_size {args.model_input_size}",
                                       args.model_input_size != DEFAULT_MODEL_INPUT_SIZE or None)) if value is not None]
    if given:
        raise DataError(f"{', '.join(given)} apply to the rank value encoding; --encoding cellfm reads "
                        "--token_dictionary (or --build_vocab) and --max_genes")
    with guarded(args, "tokenize", inputs=TOKENIZE_INPUTS) as tmp:
        cells = cell_options(args)
        if args.build_vocab is not None:
            if args.token_dictionary is not None:
                raise DataError("--build_vocab cannot be combined with --token_dictionary")
            token_dictionary, median_dictionary = build_vocabulary(
                args.input, gene_id_column=args.gene_id_column, chunk_size=args.chunk_size,
                filter_column=cells["filter_column"], obs_filter=cells["obs_filter"],
                show_progress=cells["show_progress"])
            write_dictionaries(args.build_vocab, token_dictionary, median_dictionary, overwrite=args.overwrite)
        elif args.token_dictionary is None:
            raise DataError("--encoding cellfm needs --token_dictionary (the model's tokenizer.json, or its folder) or "
                            "--build_vocab DIR")
        else:
            token_dictionary = args.token_dictionary
        dataset, stats = tokenize_cellfm(
            args.input,
            token_dictionary=token_dictionary,
            max_genes=MAX_GENES if args.max_genes is None else args.max_genes,
            return_stats=True,
            gene_name_id_dictionary=args.gene_name_id_dictionary,
            **cells,
        )
        dataset.save_to_disk(str(tmp))
    logger.info("saved %d CellFM cells (at most %d genes each) to %s", stats.n_cells_kept, stats.max_genes,
                args.output)
    return 0
