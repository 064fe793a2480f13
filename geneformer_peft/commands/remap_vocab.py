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

from geneformer_peft.commands._common import CHECKPOINT, OUTPUT_FOLDER, SEED, non_negative_int

HELP = "copy a checkpoint onto another gene vocabulary (shared genes keep their embeddings)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    p = parser.add_argument
    p("--model_path", required=True, type=CHECKPOINT, help="Pretrained checkpoint folder.")
    p("--token_dictionary", required=True, type=Path,
      help="The new vocabulary (a .json {token: id} such as token_dictionary.json, a .pkl or a tokenizer.json).")
    p("--output_dir", required=True, type=OUTPUT_FOLDER, help="Checkpoint folder to write.")
    p("--old_token_dictionary", type=Path, default=None,
      help="The checkpoint's vocabulary (.json {token: id}, .pkl or tokenizer.json), when it has no "
           "tokenizer.json.")
    p("--pad_to_multiple_of", type=non_negative_int, default=8,
      help="Round the vocabulary size up to a multiple (%(default)s).")
    p("--seed", type=SEED, default=0, help="Seed of the fresh rows (%(default)s).")
    p("--allow_low_gene_overlap", action="store_true",
      help="Write the copy even when fewer than half of the new vocabulary's genes have pretrained rows "
           "(default: refuse).")
    p("--reinit_all_rows", action="store_true",
      help="Start every embedding row fresh for the new vocabulary, keeping none of the checkpoint's (CellFM's "
           "fine-tuning recipe; the default keeps the rows of shared genes).")
    p("--overwrite", action="store_true", help="Replace an existing --output_dir.")


def run(args: argparse.Namespace) -> int:
    from geneformer_peft.checks import MIN_GENE_OVERLAP
    from geneformer_peft.commands._common import guarded
    from geneformer_peft.models.vocabulary import remap_checkpoint_vocabulary

    with guarded(args, "remap-vocab", output="output_dir",
                 inputs=("model_path", "token_dictionary", "old_token_dictionary")) as tmp:
        shared = remap_checkpoint_vocabulary(args.model_path, args.token_dictionary, tmp,
                                             old_token_dictionary=args.old_token_dictionary,
                                             pad_to_multiple_of=args.pad_to_multiple_of, seed=args.seed,
                                             min_gene_overlap=MIN_GENE_OVERLAP,
                                             allow_low_gene_overlap=args.allow_low_gene_overlap,
                                             reinit_all_rows=args.reinit_all_rows)
    print(f"{shared} genes shared with the checkpoint's vocabulary -> {args.output_dir}")
    return 0
