"""Put a pretrained checkpoint on another gene vocabulary (e.g. one built from your data).

Writes a copy of --model_path whose word-embedding matrix follows --token_dictionary:
rows of genes both vocabularies share are copied from the checkpoint, the others are
initialised fresh, the size is padded to a multiple of --pad_to_multiple_of; every other
weight is copied unchanged. The checkpoint's own vocabulary comes from its tokenizer.json
or --old_token_dictionary (Geneformer V1 checkpoints ship none: pass token_dictionary.pkl).
A CellFM checkpoint's gene_emb is remapped the same way (fresh rows xavier-normal, the pad row 0);
--reinit_all_rows keeps no pretrained row (CellFM's fine-tuning recipe, then finetune with
freeze_preset "cellfm"; see docs/cellfm.md).

Example:
  geneformer-peft remap-vocab --model_path /path/to/gf-6L-30M-i2048 \\
      --old_token_dictionary token_dictionary.pkl --token_dictionary my_vocab/token_dictionary.pkl \\
      --output_dir gf-6L-my-vocab
"""
from __future__ import annotations

import argparse
from pathlib import Path

HELP = "copy a checkpoint onto another gene vocabulary (shared genes keep their embeddings)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    p = parser.add_argument
    p("--model_path", required=True, type=Path, help="Pretrained checkpoint folder.")
    p("--token_dictionary", required=True, type=Path,
      help="The new vocabulary (a .json {token: id} such as token_dictionary.json, a .pkl or a tokenizer.json).")
    p("--output_dir", required=True, type=Path, help="Checkpoint folder to write.")
    p("--old_token_dictionary", type=Path, default=None,
      help="The checkpoint's vocabulary (.json {token: id}, .pkl or tokenizer.json), when it has no "
           "tokenizer.json.")
    p("--pad_to_multiple_of", type=int, default=8, help="Round the vocabulary size up to a multiple (%(default)s).")
    p("--seed", type=int, default=0, help="Seed of the fresh rows (%(default)s).")
    p("--allow_low_gene_overlap", action="store_true",
      help="Write the copy even when fewer than half of the new vocabulary's genes have pretrained rows "
           "(default: refuse).")
    p("--reinit_all_rows", action="store_true",
      help="Start every embedding row fresh for the new vocabulary, keeping none of the checkpoint's (CellFM's "
           "fine-tuning recipe; the default keeps the rows of shared genes).")
    p("--overwrite", action="store_true", help="Replace an existing --output_dir.")


def run(args: argparse.Namespace) -> int:
    from geneformer_peft.commands._common import check_output_path
    from geneformer_peft.checks import MIN_GENE_OVERLAP
    from geneformer_peft.models.vocabulary import remap_checkpoint_vocabulary

    check_output_path(args.output_dir, overwrite=args.overwrite, flag="--output_dir")
    shared = remap_checkpoint_vocabulary(args.model_path, args.token_dictionary, args.output_dir,
                                         old_token_dictionary=args.old_token_dictionary,
                                         pad_to_multiple_of=args.pad_to_multiple_of, seed=args.seed,
                                         min_gene_overlap=MIN_GENE_OVERLAP,
                                         allow_low_gene_overlap=args.allow_low_gene_overlap,
                                         reinit_all_rows=args.reinit_all_rows)
    print(f"{shared} genes shared with the checkpoint's vocabulary -> {args.output_dir}")
    return 0
