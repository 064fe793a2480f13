"""Regenerate the shipped example from fixed seeds (the one documented command):

    python example_py/make_example.py

1. Synthetic raw counts (geneformer_peft.data.synthetic): 4,000 unlabelled cells for
   pretraining and 500 labelled cells of 5 imbalanced cell types, in the same gene space. The
   labelled cells also get a second label, ``cell_state`` (cycling / quiescent), which cuts across
   the types (cell_states: a gene-module score ranked within each type; the middle fifth of each
   type is left unlabelled), for multi-task fine-tuning (docs/multitask.md). It is read from the
   counts, so the tokens, the cell types and the folds are those made without it.
2. A vocabulary and gene medians built from the unlabelled cells (as Geneformer built its
   dictionaries from its pretraining corpus).
3. Rank-value tokenization of both sets; the labelled cells split into 5 stratified folds
   under example_py/data/synthetic/ (the reference layout).
4. A tiny BERT (3 layers, hidden 64, cells cut to their top 256 genes) pretrained on the unlabelled cells with Geneformer's
   masked-gene objective, written to Pretrain_ckpts/geneformer-tiny-example/ with the example's fine-tuning
   settings (FINETUNE_SETTINGS: the method, mean pooling, no attention dropout) in its config.json.
5. scBERT (docs/scbert.md): a 255-gene panel (the most variable genes of the unlabelled cells'
   log-normalised expression), both sets binned on it (256 positions), the labelled cells split
   into the same 5 folds as step 3 under example_py/data/synthetic_binned/, and a tiny scBERT
   (2 layers, dim 32, fixed random gene vectors) pretrained with masked expression modelling,
   written to Pretrain_ckpts/scbert-tiny-example/.
6. CellFM (docs/cellfm.md): both sets tokenized with CellFM's encoding (log1p of counts per 10,000,
   the expressed genes of the unlabelled cells' vocabulary, at most 256 per cell, highest values
   first), the labelled cells split into the same 5 folds as step 3 under
   example_py/data/synthetic_cellfm/, and a tiny CellFM (2 layers, hidden 32, 4 heads) pretrained
   with masked-value regression, written to Pretrain_ckpts/cellfm-tiny-example/ (prompt_type lora).

    python example_py/make_example.py --only scbert     # step 5 alone (steps 1 and 5 run)
    python example_py/make_example.py --only cellfm     # step 6 alone (steps 1 and 6 run)
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

import torch  # noqa: E402
from datasets import Sequence, Value  # noqa: E402

from geneformer_peft.data.cells import EncodedCells  # noqa: E402
from geneformer_peft.data.folds import split_folds  # noqa: E402
from geneformer_peft.data.rank_value import tokenize_anndata  # noqa: E402
from geneformer_peft.data.synthetic import generate_counts, generate_unlabelled_counts  # noqa: E402
from geneformer_peft.data.vocab import build_vocabulary, write_dictionaries  # noqa: E402
from geneformer_peft.training.pretrain import pretrain  # noqa: E402
from geneformer_peft.data.binned import tokenize_binned, write_panel_files  # noqa: E402
from geneformer_peft.data.cellfm import tokenize_cellfm  # noqa: E402
from transformerslocal import BertConfig, CellFMConfig, PerformerConfig, PerformerForMaskedLM  # noqa: E402

logger = logging.getLogger("make_example")

TINY_CONFIG = dict(hidden_size=64, num_hidden_layers=3, num_attention_heads=4, intermediate_size=128,
                   max_position_embeddings=256, hidden_act="relu", hidden_dropout_prob=0.02,
                   attention_probs_dropout_prob=0.02, initializer_range=0.02, layer_norm_eps=1e-12,
                   type_vocab_size=2, pad_token_id=0)

#: fine-tuning settings written into the checkpoint's config.json after pretraining (pretraining
#: itself used TINY_CONFIG): the gene-token adapter (the PEFT method with the best validation
#: macro-F1 on the example, docs/example_methods.md), the classifier pools the mean of the gene tokens (V1 inputs carry no
#: <cls>, so "first" would pool the top-ranked gene's state alone), and no attention dropout: on a
#: CPU a dropped-out attention cannot use the fused kernel, which made each training step 3.9x
#: slower on this model (hidden dropout 0.02 stays). docs/example_methods.md measures both.
FINETUNE_SETTINGS = dict(prompt_type="Gene_token_prompt", classifier_pooling="mean", attention_probs_dropout_prob=0.0)

#: the tiny scBERT: 2 layers, dim 32, 4 heads of 8; no feature redraw, so the PEFT methods' frozen
#: backbone keeps its random features (docs/scbert.md, "Feature redraw")
SCBERT_PANEL_SIZE = 255
SCBERT_CONFIG = dict(num_tokens=7, dim=32, depth=2, heads=4, dim_head=8, feature_redraw_interval=None,
                     pos_embedding="gene2vec", pos_embedding_seed=0)


#: the second label of the labelled cells (multi-task example, docs/multitask.md) and its gene module:
#: STATE_MODULE genes ranked by mean expression in the unlabelled cells (unsupervised, as the panel)
STATE_COLUMN = "cell_state"
STATE_MODULE = slice(100, 150)


def cell_states(unlabelled, labelled) -> list:
    """Each labelled cell's state: the mean log1p(counts per 10,000) of a gene module (the 101st to
    150th most expressed genes of the unlabelled cells) ranked among the cells of its own type, so
    that every type holds both states: the top two fifths "cycling", the bottom two fifths
    "quiescent", the middle fifth ``None`` (unlabelled: a cell missing this label counts for the
    cell-type task only). Deterministic, and draws no random number."""
    import numpy as np
    import scipy.sparse as sp

    def dense(x):
        return np.asarray(x.todense() if sp.issparse(x) else x, dtype=np.float64)

    means = np.asarray(unlabelled.X.mean(axis=0)).ravel()
    module = np.argsort(-means, kind="stable")[STATE_MODULE]
    totals = dense(labelled.X.sum(axis=1)).ravel()
    score = np.log1p(dense(labelled.X[:, module]) / np.maximum(totals, 1.0)[:, None] * 1e4).mean(axis=1)
    types = labelled.obs["cell_type"].astype(str).to_numpy()
    states: list = [None] * labelled.n_obs
    for cell_type in np.unique(types):
        members = np.flatnonzero(types == cell_type)
        order = members[np.argsort(score[members], kind="stable")]
        for rank, cell in enumerate(order):
            quantile = rank / max(len(order) - 1, 1)
            states[cell] = "cycling" if quantile >= 0.6 else "quiescent" if quantile < 0.4 else None
    return states


#: the tiny CellFM: 2 layers, hidden 32, 4 heads of 8, 16 value slots; cells cut to their 256 highest
#: values (as the tiny Geneformer's input); the vocabulary rows padded to a multiple of 8 (as the release)
CELLFM_CONFIG = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=32,
                     value_slots=16, max_genes=256)


def variable_genes(adata, n_genes: int) -> list[str]:
    """The ``n_genes`` genes of largest variance of ``log1p(count * 1e4 / total)`` over the cells
    (unsupervised: the unlabelled cells give the panel), in descending order of variance (ties by
    gene order)."""
    import numpy as np
    import scipy.sparse as sp

    counts = sp.csr_matrix(adata.X, dtype=np.float64)
    totals = np.asarray(counts.sum(axis=1)).ravel()
    norm = sp.diags(1e4 / np.maximum(totals, 1.0)) @ counts
    norm.data = np.log1p(norm.data)
    mean = np.asarray(norm.mean(axis=0)).ravel()
    variance = np.asarray(norm.multiply(norm).mean(axis=0)).ravel() - mean ** 2
    order = np.lexsort((np.arange(len(variance)), -variance))
    return [str(g) for g in np.asarray(adata.var_names)[order[:n_genes]]]


def load_fold_split(data_dir: Path, name: str, fold: int, split: str):
    """One split of one fold in the reference layout."""
    from datasets import load_from_disk

    return load_from_disk(str(data_dir / name / str(fold) / f"{name}_{split}{fold}.dataset"))


def make_scbert(unlabelled, labelled, *, data_dir: Path, checkpoint_dir: Path, epochs: int, seed: int) -> None:
    """Step 5: binned folds (the same cells per fold as the rank-value folds) and the tiny scBERT."""
    panel = variable_genes(unlabelled, SCBERT_PANEL_SIZE)
    # min_genes=1: no cell is dropped (a 255-gene panel has fewer than scBERT's 200 expressed genes
    # in some cells), so the labelled set keeps its 500 cells in order and split_folds, a pure
    # function of the labels, the seed and the fractions, gives the rank-value folds' cells
    pretrain_cells = tokenize_binned(unlabelled, gene_panel=panel, min_genes=1, show_progress=False)
    cells = tokenize_binned(labelled, gene_panel=panel, label_column="cell_type", keep_columns=[STATE_COLUMN],
                            min_genes=1, show_progress=False)
    if len(cells) != labelled.n_obs or len(pretrain_cells) != unlabelled.n_obs:
        raise RuntimeError(f"binned tokenization dropped cells ({len(cells)} of {labelled.n_obs} labelled, "
                           f"{len(pretrain_cells)} of {unlabelled.n_obs} unlabelled); expected none")
    if (data_dir / "synthetic_binned").exists():
        shutil.rmtree(data_dir / "synthetic_binned")
    split_folds(cells, dataset_name="synthetic_binned", output_dir=data_dir, n_folds=5, label_column="cell_type",
                seed=seed)
    write_panel_files(data_dir / "synthetic_binned", panel, None)
    if not same_folds(data_dir, "synthetic_binned"):  # the rank-value folds of the same cells
        raise RuntimeError(f"the binned folds differ from those of {data_dir / 'synthetic'}; expected the same split")

    if checkpoint_dir.exists():
        shutil.rmtree(checkpoint_dir)
    config = PerformerConfig(max_seq_len=len(panel) + 1, **SCBERT_CONFIG, architectures=["PerformerForMaskedLM"])
    torch.manual_seed(seed)
    # a fixed random N(0, 1) gene embedding (pos_embedding_seed 0): the synthetic genes have no gene2vec
    PerformerForMaskedLM(config, warn_random_positions=False).save_pretrained(checkpoint_dir)
    result = pretrain(EncodedCells.from_dataset(pretrain_cells), checkpoint_dir, model_path=checkpoint_dir,
                      epochs=epochs, batch_size=16, lr=3e-3, seed=seed, device="cpu", progress=False)
    write_panel_files(checkpoint_dir, panel, None)
    PerformerConfig.from_pretrained(checkpoint_dir).copy(prompt_type="lora").save_pretrained(checkpoint_dir)
    for record in result.history:
        logger.info("scBERT pretraining epoch %d: MLM loss %.4f (frequency-only baseline %.4f)", record["epoch"],
                    record["mlm_loss"], record["frequency_baseline_loss"])


def same_folds(data_dir: Path, name: str) -> bool:
    """Whether the folds of ``name`` hold the rank-value folds' cells (sizes and labels, cell by cell);
    ``True`` when the rank-value folds are absent (nothing to compare)."""
    import json

    reference = data_dir / "synthetic" / "split_info.json"
    if not reference.is_file():
        return True
    ours = json.loads((data_dir / name / "split_info.json").read_text())
    theirs = json.loads(reference.read_text())
    same = ours["folds"] == theirs["folds"] and ours["class_counts"] == theirs["class_counts"]
    for fold in range(5):
        for split in ("train", "val", "test"):
            same = same and (load_fold_split(data_dir, name, fold, split)["cell_type"]
                             == load_fold_split(data_dir, "synthetic", fold, split)["cell_type"])
    return same


def make_cellfm(unlabelled, labelled, *, data_dir: Path, checkpoint_dir: Path, epochs: int, seed: int) -> None:
    """Step 6: CellFM folds (the same cells per fold as the rank-value folds) and the tiny CellFM."""
    import math

    token_dictionary, _ = build_vocabulary(unlabelled, show_progress=False)
    size = CELLFM_CONFIG["max_genes"]
    pretrain_cells = tokenize_cellfm(unlabelled, token_dictionary=token_dictionary, max_genes=size,
                                     show_progress=False)
    cells = compact(tokenize_cellfm(labelled, token_dictionary=token_dictionary, label_column="cell_type",
                                    keep_columns=[STATE_COLUMN], max_genes=size, show_progress=False))
    cells = cells.cast_column("values", Sequence(Value("float16")))  # read back as float32; halves the folds
    if len(cells) != labelled.n_obs:
        raise RuntimeError(f"CellFM tokenization kept {len(cells)} of {labelled.n_obs} labelled cells; expected all")
    if (data_dir / "synthetic_cellfm").exists():
        shutil.rmtree(data_dir / "synthetic_cellfm")
    split_folds(cells, dataset_name="synthetic_cellfm", output_dir=data_dir, n_folds=5, label_column="cell_type",
                seed=seed)
    if not same_folds(data_dir, "synthetic_cellfm"):
        raise RuntimeError("the CellFM folds differ from those of the rank-value example; expected the same split")

    if checkpoint_dir.exists():
        shutil.rmtree(checkpoint_dir)
    rows = int(math.ceil((max(token_dictionary.values()) + 1) / 8) * 8)
    config = CellFMConfig(vocab_size=rows, **CELLFM_CONFIG, architectures=["CellFMForMaskedValues"])
    result = pretrain(EncodedCells.from_dataset(pretrain_cells, values_column="values"), checkpoint_dir,
                      config=config, token_dictionary=token_dictionary, epochs=epochs, batch_size=16, lr=3e-3,
                      seed=seed, device="cpu", progress=False)
    CellFMConfig.from_pretrained(checkpoint_dir).copy(prompt_type="lora").save_pretrained(checkpoint_dir)
    for record in result.history:
        logger.info("CellFM pretraining epoch %d: masked-value MSE %.4f (gene-mean baseline %.4f)", record["epoch"],
                    record["mlm_loss"], record["frequency_baseline_loss"])


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
    parser.add_argument("--scbert_checkpoint_dir", type=Path,
                        default=ROOT / "Pretrain_ckpts" / "scbert-tiny-example")
    parser.add_argument("--scbert_pretrain_epochs", type=int, default=5)
    parser.add_argument("--cellfm_checkpoint_dir", type=Path,
                        default=ROOT / "Pretrain_ckpts" / "cellfm-tiny-example")
    parser.add_argument("--cellfm_pretrain_epochs", type=int, default=5)
    parser.add_argument("--only", choices=["geneformer", "scbert", "cellfm"], default=None,
                        help="make one model family's part only (default: all, Geneformer first)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    world_seed = args.seed  # genes and cell-type programs; both sets share them
    unlabelled = generate_unlabelled_counts(n_cells=args.n_unlabelled, seed=world_seed, cell_seed=world_seed + 1)
    labelled = generate_counts(n_cells=args.n_labelled, seed=world_seed, cell_seed=world_seed + 2)
    labelled.obs[STATE_COLUMN] = cell_states(unlabelled, labelled)
    if args.only in (None, "geneformer"):
        make_geneformer(unlabelled, labelled, args)
    if args.only in (None, "scbert"):
        make_scbert(unlabelled, labelled, data_dir=args.data_dir, checkpoint_dir=args.scbert_checkpoint_dir,
                    epochs=args.scbert_pretrain_epochs, seed=args.seed)
    if args.only in (None, "cellfm"):
        make_cellfm(unlabelled, labelled, data_dir=args.data_dir, checkpoint_dir=args.cellfm_checkpoint_dir,
                    epochs=args.cellfm_pretrain_epochs, seed=args.seed)
    return 0


def make_geneformer(unlabelled, labelled, args) -> None:
    """Steps 2-4: the vocabulary, the rank-value folds and the tiny Geneformer."""
    token_dictionary, medians = build_vocabulary(unlabelled, show_progress=False)
    logger.info("vocabulary: %d tokens", len(token_dictionary))

    size = TINY_CONFIG["max_position_embeddings"]
    pretrain_cells = tokenize_anndata(unlabelled, token_dictionary=token_dictionary, gene_median_dictionary=medians,
                                      model_input_size=size, show_progress=False)
    cells = compact(tokenize_anndata(labelled, token_dictionary=token_dictionary, gene_median_dictionary=medians,
                                     label_column="cell_type", keep_columns=[STATE_COLUMN], model_input_size=size,
                                     show_progress=False))

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
    # The example job's method and fine-tuning settings: edit FINETUNE_SETTINGS to switch (pretraining
    # itself was plain BERT with TINY_CONFIG).
    BertConfig.from_pretrained(args.checkpoint_dir).copy(**FINETUNE_SETTINGS).save_pretrained(args.checkpoint_dir)
    for record in result.history:
        logger.info("pretraining epoch %d: MLM loss %.4f (frequency-only baseline %.4f)", record["epoch"],
                    record["mlm_loss"], record["frequency_baseline_loss"])


if __name__ == "__main__":
    sys.exit(main())
