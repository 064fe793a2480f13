"""Masked-gene pretraining (Geneformer's objective) from a config, or continued from a checkpoint.

15% of each cell's genes are chosen; 80% of those become <mask>, 10% a random gene, 10%
stay. Batches are grouped by length; AdamW with linear warmup and decay. The output folder
(config.json, model.safetensors, tokenizer.json) loads in `transformers` as BertForMaskedLM.
A scBERT config or checkpoint (`model_type: "scbert"`) on binned cells (`tokenize --encoding
binned`) is pretrained with scBERT's masked expression modelling (15% of the non-zero positions,
90% of those masked, 10% kept); a CellFM one (`model_type: "cellfm"`) on CellFM cells (`tokenize
--encoding cellfm`) with masked-value regression (20% of each cell's values hidden; the printed
loss is their mean squared error).

Example:
  geneformer-peft pretrain --input cells.dataset --output_dir my_ckpt --config Pretrain_ckpts/geneformer-6L-30M/config.json \\
      --token_dictionary token_dictionary.pkl --epochs 1
"""
from __future__ import annotations

import argparse
import logging
from pathlib import Path

from geneformer_peft.commands._common import CHECKPOINT, DATASET, OUTPUT_FOLDER, SEED, positive_float, positive_int

logger = logging.getLogger(__name__)

HELP = "masked-gene pretraining from a config or a checkpoint"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    p = parser.add_argument
    p("--input", required=True, type=DATASET, help="Tokenized cells (a saved datasets.Dataset with input_ids).")
    p("--output_dir", required=True, type=OUTPUT_FOLDER, help="Checkpoint folder to write.")
    src = parser.add_mutually_exclusive_group(required=True)
    src.add_argument("--config", type=Path, help="config.json of a model to pretrain from scratch.")
    src.add_argument("--model_path", type=CHECKPOINT, help="Checkpoint to continue pretraining.")
    p("--token_dictionary", type=Path, default=None,
      help="token_dictionary.json ({token: id}), token_dictionary.pkl or tokenizer.json (default: the "
           "checkpoint's tokenizer.json, if any).")
    p("--epochs", type=positive_int, default=1, help="Passes over the cells (%(default)s).")
    p("--batch_size", type=positive_int, default=16, help="Cells per batch (%(default)s).")
    p("--lr", type=positive_float, default=1e-3, help="Peak learning rate (%(default)s).")
    p("--max_steps", type=positive_int, default=None, help="Stop after this many steps.")
    p("--seed", type=SEED, default=0, help="Random seed (%(default)s).")
    p("--device", default="auto", help="auto, cpu, cuda (%(default)s).")
    p("--resize_vocab", action="store_true",
      help="With --config: size the new model's vocab_size to --token_dictionary (default: refuse a dictionary "
           "whose size differs from the config's vocab_size).")
    p("--allow_low_gene_overlap", action="store_true",
      help="With --model_path: go on when fewer than half of the input's genes have pretrained rows.")
    p("--overwrite", action="store_true", help="Replace an existing --output_dir.")


def run(args: argparse.Namespace) -> int:
    from geneformer_peft.commands._common import guarded
    from geneformer_peft.data.cells import EncodedCells
    from geneformer_peft.data.dataset_io import load_saved_dataset
    from geneformer_peft.data.vocab import load_token_dictionary
    from geneformer_peft.training.pretrain import pretrain
    from geneformer_peft.checks import check_compatibility
    from geneformer_peft.models.families import family_of

    family = family_of(args.model_path or args.config)
    with guarded(args, "pretrain", output="output_dir",
                 inputs=("input", "config", "model_path", "token_dictionary")) as tmp:
        dataset = load_saved_dataset(args.input)
        vocab_source = args.token_dictionary
        if vocab_source is None and args.model_path is not None and (args.model_path / "tokenizer.json").is_file():
            vocab_source = args.model_path / "tokenizer.json"
        token_dictionary = load_token_dictionary(vocab_source) if vocab_source else None
        config = None
        if args.config:  # the family from the file's model_type (scBERT: masked expression modelling)
            config = family.config_class.from_pretrained(args.config)
            if args.resize_vocab and token_dictionary is not None and hasattr(config, "vocab_size"):
                logger.info("--resize_vocab: vocab_size %d -> %d (%s)", config.vocab_size, len(token_dictionary),
                            vocab_source)
                config = config.copy(vocab_size=len(token_dictionary))
        elif args.resize_vocab:
            raise ValueError("--resize_vocab: only with --config (a checkpoint keeps its vocabulary; put it on "
                             "another one with geneformer-peft remap-vocab)")
        check_compatibility(args.model_path or args.config, {str(args.input): dataset}, config=config,
                            token_dictionary=vocab_source, check_shapes=args.model_path is not None,
                            allow_low_gene_overlap=args.allow_low_gene_overlap, training=True,
                            resize_vocab=bool(args.resize_vocab) if args.config else None).raise_if_refused()
        cells = EncodedCells.from_dataset(dataset, name=str(args.input), values_column=family.values_column)
        result = pretrain(cells, tmp, config=config, model_path=args.model_path,
                          token_dictionary=token_dictionary, epochs=args.epochs, batch_size=args.batch_size,
                          lr=args.lr, max_steps=args.max_steps, seed=args.seed, device=args.device)
    for record in result.history:
        print(f"epoch {record['epoch']}: MLM loss {record['mlm_loss']:.4f}")
    print(f"checkpoint: {args.output_dir}")
    return 0
