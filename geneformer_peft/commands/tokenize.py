"""Tokenize raw counts (.h5ad / .loom) into a Geneformer dataset (rank value encoding).

Each cell becomes its genes sorted by normalised expression
(counts / n_counts * 10,000 / gene median), as token ids, truncated to --model_input_size.
The dataset is saved with datasets' save_to_disk (columns input_ids, length, the label
column and --keep_columns).

Vocabulary: either two dictionaries (--token_dictionary and --gene_median_dictionary: JSON
objects {token: id} and {gene: median}, or Geneformer's .pkl files, read without running code
from them), or --build_vocab DIR to build both from this file's own counts (written to DIR as
token_dictionary.json, gene_median_dictionary.json, their .pkl forms and tokenizer.json).

Gene symbols: Geneformer's vocabulary is Ensembl ids; a file naming its genes by symbol is
refused unless --gene_name_id_dictionary maps them (Geneformer's gene_name_id_dict.pkl, or a
two-column CSV/TSV of symbol, Ensembl id). Symbols of one Ensembl id are summed; how many genes
and what share of the counts were mapped, and the unmapped genes with the most counts, are in
the dataset's stats (docs/outputs.md).

Cell filters: cells with obs[--filter_column] != 1 are skipped when that column exists;
--obs_filter col=value (repeatable; value may be a comma-separated list) keeps only cells
whose obs[col] equals one of the values, e.g. --obs_filter demuxlet_cls=SNG.

scBERT: --encoding binned --gene_panel PANEL.txt|.npy [--gene2vec FILE.npy] writes one
position per panel gene (binned log2 expression, uint8) instead; see docs/scbert.md.

CellFM: --encoding cellfm --token_dictionary MODEL/tokenizer.json [--max_genes 2048] writes each
cell's expressed genes (input_ids) with their log1p(count * 10,000 / cell total) (values), highest
value first, at most --max_genes; see docs/cellfm.md.

Example:
  geneformer-peft tokenize --input cells.h5ad --output cells.dataset \\
      --token_dictionary token_dictionary.pkl --gene_median_dictionary gene_median_dictionary.pkl \\
      --label_column cell_type --obs_filter demuxlet_cls=SNG

--nproc N splits the file's chunks into ranges that N worker processes each read, encode and
write to a shard themselves; this process joins the shards in file order: the output is
identical to --nproc 1.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from geneformer_peft.commands import _binned_tokenize, _cellfm_tokenize
from geneformer_peft.commands._common import OUTPUT_FOLDER, file_path, guarded, positive_int
from geneformer_peft.errors import DataError

logger = logging.getLogger(__name__)

#: the options naming input files, fingerprinted in the output's provenance.json
TOKENIZE_INPUTS = ("input", "token_dictionary", "gene_median_dictionary", "gene_name_id_dictionary", "gene_panel",
                   "gene2vec")
#: --model_input_size's default (V1's 2048)
DEFAULT_MODEL_INPUT_SIZE = 2048

HELP = "tokenize a .h5ad/.loom file of raw counts into a Geneformer dataset"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the options of ``tokenize``."""
    parser.add_argument("--input", required=True, type=file_path("a .h5ad or .loom file of raw counts"), help="Input .h5ad (read backed) or .loom file of raw counts.")
    parser.add_argument("--output", required=True, type=OUTPUT_FOLDER, help="Output directory of the saved dataset (e.g. X.dataset).")
    vocab = parser.add_argument_group("vocabulary (give both dictionaries, or --build_vocab)")
    vocab.add_argument("--token_dictionary", type=Path, help="Token dictionary: a .json {token: id} (token_dictionary.json), Geneformer's .pkl, a tokenizer.json, or a directory holding one.")
    vocab.add_argument("--gene_median_dictionary", type=file_path("a gene median dictionary file (.json or .pkl)"), help="Gene median dictionary: a .json {ensembl_id: median} (gene_median_dictionary.json) or Geneformer's .pkl.")
    vocab.add_argument("--build_vocab", type=OUTPUT_FOLDER, metavar="DIR", help="Build both dictionaries from this file's counts and write them to DIR (token_dictionary.json, gene_median_dictionary.json, their .pkl forms, tokenizer.json).")
    parser.add_argument("--gene_id_column", default=None, help="var column holding the gene ids (default: var['ensembl_id'] if present, else var_names; 'var_names' names the index).")
    parser.add_argument("--gene_name_id_dictionary", type=file_path("a symbol -> Ensembl id map (.pkl, .csv or .tsv)"), metavar="PATH",
                        help="Map gene symbols to Ensembl ids before matching the vocabulary: Geneformer's "
                             "gene_name_id_dict.pkl or a two-column CSV/TSV (symbol, Ensembl id). Ensembl ids in "
                             "the file pass through; symbols of one Ensembl id are summed. With --encoding cellfm and a "
                             "vocabulary of symbols (the release's), read backwards: the file's Ensembl ids become "
                             "symbols.")
    parser.add_argument("--label_column", default=None, help="obs column copied as the label (e.g. cell_type); optional.")
    parser.add_argument("--keep_columns", default="", help="Comma-separated further obs columns to copy (e.g. batch,donor).")
    parser.add_argument("--model_input_size", type=positive_int, default=DEFAULT_MODEL_INPUT_SIZE, help="Maximum tokens per cell, special tokens included (V1: 2048, V2: 4096).")
    parser.add_argument("--model_version", choices=["V1", "V2"], default="V1", help="V2 frames each cell with <cls> ... <eos>.")
    parser.add_argument("--chunk_size", type=positive_int, default=512, help="Cells read at a time (memory stays flat).")
    parser.add_argument("--nproc", type=positive_int, default=1, help="Worker processes, each reading and encoding its own ranges of chunks (output identical to 1; each holds one chunk).")
    parser.add_argument("--filter_column", default="filter_pass", help="obs column; when present only cells with value 1 are tokenized. Use '' to disable.")
    parser.add_argument("--obs_filter", action="append", default=[], metavar="COL=VALUE[,VALUE]", help="Keep only cells with obs[COL] equal to one of the values (repeatable), e.g. demuxlet_cls=SNG; a value holding a comma goes in double quotes, e.g. 'cell_type=\"CD4+, naive\",B'.")
    parser.add_argument("--overwrite", action="store_true", help="Replace an existing --output (and dictionaries in --build_vocab).")
    parser.add_argument("--no_progress", action="store_true", help="Hide progress bars.")
    _binned_tokenize.add_arguments(parser)
    _cellfm_tokenize.add_arguments(parser)


def parse_obs_filters(items: list[str]) -> dict[str, list[str]]:
    """Parse ``["col=a,b", 'col2="c, d"', ...]`` into ``{"col": ["a", "b"], "col2": ["c, d"]}``
    (:func:`~geneformer_peft.data.filters.parse_column_values`: a value holding a comma is quoted)."""
    from geneformer_peft.data.filters import parse_column_values

    filters: dict[str, list[str]] = {}
    for item in items:
        column, values = parse_column_values(item, flag="--obs_filter")
        values = [value for value in values if value]
        if not values:
            raise DataError(f"--obs_filter {item!r} is not valid; expected COLUMN=VALUE[,VALUE...]")
        filters.setdefault(column, []).extend(values)
    return filters


def cell_options(args: argparse.Namespace) -> dict:
    """How every encoding reads the cells of ``--input``: the gene id and label columns, the kept
    columns, the chunk size, the cell filters and the progress bar, as the tokenizers' keywords."""
    return dict(gene_id_column=args.gene_id_column, label_column=args.label_column,
                keep_columns=[c.strip() for c in args.keep_columns.split(",") if c.strip()],
                chunk_size=args.chunk_size, filter_column=args.filter_column or None,
                obs_filter=parse_obs_filters(args.obs_filter), show_progress=not args.no_progress)


def run(args: argparse.Namespace) -> int:
    """Run ``tokenize``."""
    if args.encoding == "binned":
        if args.gene_name_id_dictionary is not None:
            raise DataError("--gene_name_id_dictionary applies to the rank value encoding; --encoding binned "
                            "matches --gene_panel against --gene_id_column as given")
        if args.nproc != 1:
            raise DataError(f"--nproc {args.nproc} applies to the rank value encoding; --encoding binned runs in one process")
        return _binned_tokenize.run(args)
    if args.encoding == "cellfm":
        if args.nproc != 1:
            raise DataError(f"--nproc {args.nproc} applies to the rank value encoding; --encoding cellfm runs in one "
                            "process")
        return _cellfm_tokenize.run(args)
    _binned_tokenize.refuse_binned_options(args)
    _cellfm_tokenize.refuse_cellfm_options(args)
    from geneformer_peft.data.rank_value import tokenize_anndata
    from geneformer_peft.data.vocab import tokenizer_dictionaries

    with guarded(args, "tokenize", inputs=TOKENIZE_INPUTS) as tmp:
        cells = cell_options(args)
        token_dictionary, median_dictionary = tokenizer_dictionaries(
            args.input, token_dictionary=args.token_dictionary, gene_median_dictionary=args.gene_median_dictionary,
            build_vocab=args.build_vocab, overwrite=args.overwrite, gene_id_column=args.gene_id_column,
            gene_name_id_dictionary=args.gene_name_id_dictionary, model_version=args.model_version,
            chunk_size=args.chunk_size, filter_column=cells["filter_column"], obs_filter=cells["obs_filter"],
            show_progress=cells["show_progress"])
        dataset, stats = tokenize_anndata(
            args.input,
            token_dictionary=token_dictionary,
            gene_median_dictionary=median_dictionary,
            model_input_size=args.model_input_size,
            model_version=args.model_version,
            return_stats=True,
            gene_name_id_dictionary=args.gene_name_id_dictionary,
            nproc=args.nproc,
            **cells,
        )
        dataset.save_to_disk(str(tmp))
    logger.info("saved %d cells to %s", stats.n_cells_kept, args.output)
    return 0
