"""Convert a released CellFM checkpoint (MindSpore .ckpt) into a checkpoint folder of this project.

The .ckpt is read without MindSpore. The folder written holds config.json (model_type "cellfm",
sizes read from the tensors' shapes), model.safetensors, and with --gene_table a tokenizer.json
mapping each gene of the release's table to its gene_emb row (data row i of the table is row i;
row 0 is "<pad>"). Optimizer moments, training scalars and the pretraining decoders are dropped
and reported; any other entry the encoder has no place for stops the conversion unless
--drop_unknown. The folder appears complete or not at all.

The number of heads cannot be read from the shapes: give --num_attention_heads (the 80M and 800M
releases: 48); without it the release's head dim 32 is assumed.

Example:
  geneformer-peft convert-cellfm --checkpoint CellFM_80M_weight.ckpt --output_dir cellfm_80m \\
      --num_attention_heads 48 --gene_table expand_gene_info.csv
"""

from __future__ import annotations

import argparse
import csv
import logging
from pathlib import Path

from geneformer_peft.commands._common import OUTPUT_FOLDER, file_path, guarded, positive_int
from geneformer_peft.errors import DataError

logger = logging.getLogger(__name__)

HELP = "convert a released CellFM MindSpore .ckpt into a checkpoint folder (config.json + model.safetensors)"

#: column names taken as the gene symbol when --gene_column is not given (case-insensitive), in this order
GENE_COLUMNS = ("gene_symbol", "gene_name", "symbol", "hgnc_symbol", "gene", "genes")
PAD_TOKEN = "<pad>"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the options of ``convert-cellfm``."""
    parser.add_argument("--checkpoint", required=True, type=file_path("a MindSpore .ckpt file"), help="The CellFM .ckpt (e.g. CellFM_80M_weight.ckpt).")
    parser.add_argument("--output_dir", required=True, type=OUTPUT_FOLDER, help="Checkpoint folder to write.")
    parser.add_argument("--num_attention_heads", type=positive_int, default=None,
                        help="Heads of the model (the releases: 48); default: hidden size / 32.")
    parser.add_argument("--gene_table", type=file_path("a gene table (.csv)"), metavar="CSV",
                        help="The release's gene table (expand_gene_info.csv): data row i is gene_emb row i; "
                             "written as tokenizer.json.")
    parser.add_argument("--gene_column", default=None,
                        help=f"Column of --gene_table holding the gene names; default: the first of {list(GENE_COLUMNS)} "
                             "present (case-insensitive), else the first column that is not an unnamed index.")
    parser.add_argument("--max_genes", type=positive_int, default=2048,
                        help="Expressed genes per cell the model takes at most (the release's tutorials: 2048).")
    parser.add_argument("--drop_unknown", action="store_true",
                        help="Drop entries that are neither encoder weights, optimizer state, training scalars nor "
                             "pretraining decoders (reported) instead of stopping.")
    parser.add_argument("--overwrite", action="store_true", help="Replace an existing --output_dir.")


def read_gene_table(path: Path, *, column: str | None = None) -> list[str]:
    """The gene names of a CellFM gene table, in row order (data row i -> gene_emb row i).

    Parameters
    ----------
    path
        A CSV (or ``.tsv``) file with a header row.
    column
        The column holding the names; default: see :data:`GENE_COLUMNS`.

    Raises
    ------
    DataError
        If the file has no such column, or a name is empty or repeated (naming the row).
    """
    if not path.is_file():
        raise FileNotFoundError(f"--gene_table {path} does not exist; expected the release's gene table (CSV)")
    delimiter = "\t" if path.suffix.lower() in (".tsv", ".tab") else ","
    with open(path, newline="", encoding="utf-8-sig") as handle:
        rows = list(csv.reader(handle, delimiter=delimiter))
    if len(rows) < 2:
        raise DataError(f"{path}: {len(rows)} line(s); expected a header row and one row per gene")
    header = [h.strip() for h in rows[0]]
    if column is not None:
        if column not in header:
            raise DataError(f"{path}: no column {column!r} (--gene_column); the columns are {header}")
        index = header.index(column)
    else:
        lowered = [h.lower() for h in header]
        named = [lowered.index(c) for c in GENE_COLUMNS if c in lowered]
        unnamed_index = header[0] in ("", "Unnamed: 0")
        index = named[0] if named else (1 if unnamed_index and len(header) > 1 else 0)
    genes: list[str] = []
    seen: dict[str, int] = {}
    for line, row in enumerate(rows[1:], start=2):
        name = row[index].strip() if index < len(row) else ""
        if not name:
            raise DataError(f"{path}: line {line} has no gene name in column {header[index]!r}; expected one per row")
        if name in seen:
            raise DataError(f"{path}: gene {name!r} in column {header[index]!r} is on line {seen[name]} and on line "
                            f"{line}; expected each gene once (one gene_emb row each)")
        seen[name] = line
        genes.append(name)
    logger.info("%s: %d genes from column %r", path, len(genes), header[index])
    return genes


def gene_vocabulary(genes: list[str], vocab_size: int, *, source: str) -> dict[str, int]:
    """``{"<pad>": 0, gene_i: i}``, checked against the checkpoint's ``vocab_size`` rows (the release
    pads the rows to a multiple of 8, so at most 7 rows beyond the genes)."""
    rows = len(genes) + 1
    if rows > vocab_size or vocab_size - rows >= 8:
        raise DataError(f"{source}: {len(genes)} genes (+ the pad row) for a gene embedding of {vocab_size} rows; "
                        "expected the table the checkpoint was trained with (rows = genes + 1, padded to a "
                        "multiple of 8)")
    if PAD_TOKEN in genes:
        raise DataError(f"{source}: holds a gene called {PAD_TOKEN!r}; that name is row 0, the padding")
    return {PAD_TOKEN: 0, **{gene: i for i, gene in enumerate(genes, start=1)}}


def run(args: argparse.Namespace) -> int:
    """Run ``convert-cellfm``."""
    from geneformer_peft.data.vocab import save_tokenizer_json
    from transformerslocal.configuration_cellfm import CellFMConfig
    from transformerslocal.convert_cellfm import convert_cellfm_checkpoint

    genes = read_gene_table(args.gene_table, column=args.gene_column) if args.gene_table is not None else None
    with guarded(args, "convert-cellfm", output="output_dir", inputs=("checkpoint", "gene_table")) as tmp:
        try:
            convert_cellfm_checkpoint(args.checkpoint, tmp, num_attention_heads=args.num_attention_heads,
                                      drop_unknown=args.drop_unknown, max_genes=args.max_genes)
        except FileNotFoundError:
            raise
        except ValueError as err:
            raise DataError(f"--checkpoint: {err}") from err
        if genes is not None:
            config = CellFMConfig.from_pretrained(tmp)
            save_tokenizer_json(gene_vocabulary(genes, config.vocab_size, source=str(args.gene_table)), tmp)
    logger.info("wrote %s", args.output_dir)
    return 0
