"""Regenerate the shipped example from fixed seeds (the one documented command):

    python example_py/make_example.py

1. Synthetic raw counts (geneformer_peft.data.synthetic): 4,000 unlabelled cells for
   pretraining and 500 labelled cells of 5 imbalanced cell types, in the same gene space.
2. A vocabulary and gene medians built from the unlabelled cells (as Geneformer built its
   dictionaries from its pretraining corpus).
3. Rank-value tokenization of both sets; the labelled cells split into 5 stratified folds
   under example_py/data/synthetic/ (the reference layout).
4. A tiny BERT (3 layers, hidden 64, cells cut to their top 256 genes) pretrained on the unlabelled cells with Geneformer's
   masked-gene objective, written to Pretrain_ckpts/geneformer-tiny-example/.
"""
import argparse
import logging
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
try:
    import geneformer_peft  # noqa: F401
except ImportError:
    sys.path.insert(0, str(ROOT))

from datasets import Sequence, Value  # noqa: E402

from geneformer_peft.data.cells import EncodedCells  # noqa: E402
from geneformer_peft.data.folds import split_folds  # noqa: E402
from geneformer_peft.data.rank_value import tokenize_anndata  # noqa: E402
from geneformer_peft.data.synthetic import generate_counts, generate_unlabelled_counts  # noqa: E402
from geneformer_peft.data.vocab import build_vocabulary, write_dictionaries  # noqa: E402
from geneformer_peft.training.pretrain import pretrain  # noqa: E402
from transformerslocal import BertConfig  # noqa: E402

logger = logging.getLogger("make_example")

TINY_CONFIG = dict(hidden_size=64, num_hidden_layers=3, num_attention_heads=4, intermediate_size=128,
                   max_position_embeddings=256, hidden_act="relu", hidden_dropout_prob=0.02,
                   attention_probs_dropout_prob=0.02, initializer_range=0.02, layer_norm_eps=1e-12,
                   type_vocab_size=2, pad_token_id=0)


def compact(dataset):
    """Store token ids as int16 (the vocabulary is small): the shipped folds stay small."""
    return dataset.cast_column("input_ids", Sequence(Value("int16")))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data_dir", type=Path, default=ROOT / "example_py" / "data")
    parser.add_argument("--checkpoint_dir", type=Path, default=ROOT / "Pretrain_ckpts" / "geneformer-tiny-example")
    parser.add_argument("--n_labelled", type=int, default=500)
    parser.add_argument("--n_unlabelled", type=int, default=4000)
    parser.add_argument("--pretrain_epochs", type=int, default=15)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    world_seed = args.seed  # genes and cell-type programs; both sets share them
    unlabelled = generate_unlabelled_counts(n_cells=args.n_unlabelled, seed=world_seed, cell_seed=world_seed + 1)
    labelled = generate_counts(n_cells=args.n_labelled, seed=world_seed, cell_seed=world_seed + 2)
    token_dictionary, medians = build_vocabulary(unlabelled, show_progress=False)
    logger.info("vocabulary: %d tokens", len(token_dictionary))

    size = TINY_CONFIG["max_position_embeddings"]
    pretrain_cells = tokenize_anndata(unlabelled, token_dictionary=token_dictionary, gene_median_dictionary=medians,
                                      model_input_size=size, show_progress=False)
    cells = compact(tokenize_anndata(labelled, token_dictionary=token_dictionary, gene_median_dictionary=medians,
                                     label_column="cell_type", model_input_size=size, show_progress=False))

    if (args.data_dir / "synthetic").exists():
        shutil.rmtree(args.data_dir / "synthetic")
    split_folds(cells, dataset_name="synthetic", output_dir=args.data_dir, n_folds=5, label_column="cell_type",
                seed=args.seed)

    if args.checkpoint_dir.exists():
        shutil.rmtree(args.checkpoint_dir)
    config = BertConfig(vocab_size=len(token_dictionary), **TINY_CONFIG, architectures=["BertForMaskedLM"])
    result = pretrain(EncodedCells.from_dataset(pretrain_cells), args.checkpoint_dir, config=config,
                      token_dictionary=token_dictionary, epochs=args.pretrain_epochs, batch_size=16, lr=3e-3,
                      seed=args.seed, device="cpu")
    write_dictionaries(args.checkpoint_dir, token_dictionary, medians, overwrite=True)
    # The example job's method: edit prompt_type in this file to switch (pretraining itself was plain BERT).
    BertConfig.from_pretrained(args.checkpoint_dir).copy(prompt_type="lora").save_pretrained(args.checkpoint_dir)
    for record in result.history:
        logger.info("pretraining epoch %d: MLM loss %.4f (frequency-only baseline %.4f)", record["epoch"],
                    record["mlm_loss"], record["frequency_baseline_loss"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
