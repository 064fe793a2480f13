"""Convert a released scBERT checkpoint (.pth) into a checkpoint folder of this project.

scBERT's ``panglao_pretrain.pth`` holds ``{"model_state_dict": ...}`` in performer-pytorch's
names; the folder written holds config.json (``model_type: "scbert"``, sizes read from the
tensors' shapes) and model.safetensors, plus gene_panel.txt with --gene_panel. A fine-tuned
scBERT checkpoint (its classification head) converts too.

--key_stabilizer: "cell" (default) computes the attention as the scBERT release does when it
runs one cell at a time; "head" as performer-pytorch >= 1.0 (docs/scbert.md, "Kernel").

Example:
  geneformer-peft convert-scbert --checkpoint panglao_pretrain.pth --output_dir scbert_pretrained \\
      --gene2vec gene2vec_16906.npy --gene_panel gene_panel_16906.txt
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from geneformer_peft.commands._common import OUTPUT_FOLDER, file_path, guarded

logger = logging.getLogger(__name__)

HELP = "convert a released scBERT .pth checkpoint into a checkpoint folder (config.json + model.safetensors)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the options of ``convert-scbert``."""
    parser.add_argument("--checkpoint", required=True, type=file_path("a scBERT .pth file"), help="The scBERT .pth (e.g. panglao_pretrain.pth).")
    parser.add_argument("--output_dir", required=True, type=OUTPUT_FOLDER, help="Checkpoint folder to write.")
    parser.add_argument("--gene2vec", type=file_path("a .npy file of gene vectors"), metavar="FILE.npy",
                        help="The gene2vec vectors the model was trained with (checked against the checkpoint's "
                             "positional embedding).")
    parser.add_argument("--gene_panel", type=file_path("a gene panel file (.txt or .npy)"), metavar="PANEL.txt|.npy",
                        help="The model's genes in position order; written to the folder as gene_panel.txt "
                             "(for tokenize --encoding binned).")
    parser.add_argument("--key_stabilizer", choices=["cell", "head"], default="cell",
                        help="cell: as the scBERT release (default); head: as performer-pytorch >= 1.0.")
    parser.add_argument("--allow_pickle", action="store_true",
                        help="Unpickle the .pth fully (only for a trusted file that cannot be read as tensors only).")
    parser.add_argument("--overwrite", action="store_true", help="Replace an existing --output_dir.")


def run(args: argparse.Namespace) -> int:
    """Run ``convert-scbert``."""
    from geneformer_peft.data.binned import read_gene2vec, read_gene_panel
    from transformerslocal.convert_scbert import convert_scbert_checkpoint

    with guarded(args, "convert-scbert", output="output_dir", inputs=("checkpoint", "gene2vec", "gene_panel")) as tmp:
        panel = read_gene_panel(args.gene_panel) if args.gene_panel is not None else None
        gene2vec = (read_gene2vec(args.gene2vec, n_genes=None if panel is None else len(panel))
                    if args.gene2vec else None)
        convert_scbert_checkpoint(args.checkpoint, tmp, gene2vec=gene2vec,
                                  gene_panel=None if panel is None else list(panel),
                                  key_stabilizer=args.key_stabilizer, allow_pickle=args.allow_pickle)
    logger.info("wrote %s", args.output_dir)
    return 0
