"""Masked-gene pretraining, Geneformer's objective: 15% of genes chosen, 80% masked,
10% replaced by a random gene, 10% kept; length-grouped batches; AdamW with linear
warmup and decay. Writes a checkpoint that ``transformers`` loads as ``BertForMaskedLM``.

A scBERT (``model_type: "scbert"``) config or checkpoint is pretrained with scBERT's masked
expression modelling instead (:class:`~geneformer_peft.data.binned_collator.BinnedMaskingCollator`:
15% of the non-zero positions, 90% of those masked, the rest kept) on binned cells, and a CellFM one
(``model_type: "cellfm"``) with masked-value regression on CellFM cells
(:class:`~geneformer_peft.data.cellfm_collator.CellFMMaskingCollator`: ``mask_ratio`` (0.2) of
each cell's values hidden, the loss the squared error of the predicted values there; the history's
``mlm_loss`` is then that mean squared error)."""
from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from geneformer_peft.data.binned_collator import BinnedMaskingCollator
from geneformer_peft.data.cellfm_collator import CellFMMaskingCollator
from geneformer_peft.data.cells import EncodedCells
from geneformer_peft.data.collator import MaskedLMCollator
from geneformer_peft.data.samplers import LengthGroupedSampler
from geneformer_peft.data.vocab import save_tokenizer_json
from geneformer_peft.errors import TrainingDiverged
from geneformer_peft.models.device import autocast, resolve_device
from geneformer_peft.models.families import check_input_lengths, family_of, family_of_config
from geneformer_peft.training.schedules import make_optimizer, make_scheduler
from geneformer_peft.training.trainer import set_seed
from transformerslocal import BertConfig

logger = logging.getLogger(__name__)

__all__ = ["PretrainResult", "frequency_baseline_loss", "gene_mean_baseline_loss", "pretrain"]


@dataclass
class PretrainResult:
    output_dir: Path
    history: list
    seconds: float


def frequency_baseline_loss(cells: EncodedCells, vocab_size: int, *, min_token: int = 0) -> float:
    """Cross-entropy of guessing each masked gene from gene frequencies alone (the entropy of
    the token distribution): what a model that ignores the context reaches. ``min_token``: the
    smallest token that can be masked (1 for binned cells, whose zeros are never masked)."""
    counts = np.bincount(cells.flat[cells.flat >= min_token], minlength=vocab_size).astype(np.float64)
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log(p)).sum())


def gene_mean_baseline_loss(cells: EncodedCells) -> float:
    """Mean squared error of guessing each masked value by its gene's mean value over the cells
    (CellFM's masked-value objective): what a model that ignores the cell reaches."""
    genes = cells.flat.astype(np.int64)
    values = cells.values.astype(np.float64)
    if not len(values):
        return float("nan")
    n = np.bincount(genes)
    means = np.bincount(genes, weights=values) / np.maximum(n, 1)
    return float(np.mean((values - means[genes]) ** 2))


def pretrain(cells: EncodedCells, output_dir: str | Path, *, config: BertConfig | None = None,
             model_path: str | Path | None = None, token_dictionary: dict | None = None, epochs: int = 1,
             batch_size: int = 16, lr: float = 1e-3, weight_decay: float = 0.001, warmup_ratio: float = 0.05,
             mlm_probability: float = 0.15, seed: int = 0, device: str = "auto", precision: str = "fp32",
             max_steps: int | None = None, progress: bool = True, safe_serialization: bool = True) -> PretrainResult:
    """Pretrain a fresh model from ``config``, or continue from ``model_path``.

    Parameters
    ----------
    cells
        Tokenized cells (labels not needed).
    output_dir
        Where the checkpoint (``config.json``, weights, ``tokenizer.json``) is written.
    config, model_path
        Exactly one: a config for a model from scratch, or a checkpoint to continue.
    token_dictionary
        The vocabulary (gives the special tokens for masking; written as ``tokenizer.json``).
    """
    if (config is None) == (model_path is None):
        raise ValueError("pretrain needs exactly one of config (from scratch) or model_path (continue)")
    set_seed(seed)
    dev = resolve_device(device)
    family = family_of(model_path) if model_path is not None else family_of_config(config)
    if model_path is not None:
        model = family.masked_lm_class.from_pretrained(model_path)
    else:
        model = family.masked_lm_class(config)
    model.train().to(dev)
    config = model.config
    binned = family.fixed_length  # scBERT: binned cells, masked expression modelling
    with_values = family.values_column is not None  # CellFM: masked-value regression
    if with_values:
        if cells.values is None:
            raise ValueError(f"{family.model_type[0]} pretraining needs the cells' {family.values_column!r} (read "
                             f"them with EncodedCells.from_dataset(values_column={family.values_column!r}))")
        longest = family.data_length(config.max_position_embeddings)
        too_long = int((cells.lengths > longest).sum())
        if too_long:
            raise ValueError(f"{too_long} cells have more genes than max_genes={longest}")
        collator = CellFMMaskingCollator(mask_ratio=config.mask_ratio, pad_token_id=config.pad_token_id, seed=seed)
        ignore_label = None
    elif binned:
        check_input_lengths(config, np.diff(cells.offsets), source="pretraining cells")
        collator = BinnedMaskingCollator(bin_num=config.bin_num, mask_prob=mlm_probability, seed=seed)
        ignore_label = config.mask_token_id
    else:
        too_long = int((cells.lengths > config.max_position_embeddings).sum())
        if too_long:
            raise ValueError(f"{too_long} cells are longer than max_position_embeddings="
                             f"{config.max_position_embeddings}")
        collator = MaskedLMCollator(token_dictionary, vocab_size=None if token_dictionary else config.vocab_size,
                                    mlm_probability=mlm_probability, seed=seed)
        ignore_label = -100
    sampler = LengthGroupedSampler(cells.lengths, batch_size, seed=seed)
    loader = DataLoader(cells, batch_size=batch_size, sampler=sampler, collate_fn=collator)
    total = epochs * len(loader) if max_steps is None else min(max_steps, epochs * len(loader))
    optimizer = make_optimizer(model, lr=lr, weight_decay=weight_decay)
    scheduler = make_scheduler(optimizer, total, warmup_ratio=warmup_ratio)
    if with_values:
        floor = gene_mean_baseline_loss(cells)
        logger.info("masked-value loss (MSE) of predicting every masked value by its gene's mean alone: %.4f; "
                    "below it, the model uses the cell's other genes", floor)
    else:
        floor = frequency_baseline_loss(cells, config.vocab_size, min_token=1 if binned else 0)
        logger.info("MLM loss of predicting every masked gene by its frequency alone: %.4f (uniform: %.4f); "
                    "below it, the model uses the cell's other genes", floor, math.log(config.vocab_size))
    history, step, t0 = [], 0, time.perf_counter()
    for epoch in range(1, epochs + 1):
        sampler.set_epoch(epoch)
        losses = []
        bar = tqdm(loader, desc=f"pretrain epoch {epoch}/{epochs}", disable=None if progress else True, leave=False)
        for batch in bar:
            if step >= total:
                break
            ids = batch["input_ids"].to(dev)
            labels = batch["labels"].to(dev)
            if with_values:
                if not bool(batch["value_mask"].any()):
                    continue  # cells without genes only
            elif not bool((labels != ignore_label).any()):
                continue  # nothing chosen in this batch (tiny batches only)
            with autocast(dev, precision):
                if with_values:
                    loss = model(ids, batch["values"].to(dev), batch["attention_mask"].to(dev),
                                 value_mask=batch["value_mask"].to(dev), labels=labels).loss
                elif binned:
                    loss = model.masked_lm_loss(ids, labels)
                else:
                    loss = model.masked_lm_loss(ids, batch["attention_mask"].to(dev), labels)
            if not torch.isfinite(loss):
                raise TrainingDiverged(f"pretraining loss is {loss.item()} at step {step}; lower --lr")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            scheduler.step()
            step += 1
            losses.append(loss.item())
            bar.set_postfix(loss=f"{np.mean(losses[-50:]):.4f}")
        record = {"epoch": epoch, "mlm_loss": float(np.mean(losses)) if losses else float("nan"), "steps": step,
                  "frequency_baseline_loss": floor}
        history.append(record)
        logger.info("pretrain epoch %d: MLM loss %.4f (%d steps)", epoch, record["mlm_loss"], step)
    seconds = time.perf_counter() - t0
    output_dir = Path(output_dir)
    model.to("cpu").eval()
    model.save_pretrained(output_dir, safe_serialization=safe_serialization)
    if token_dictionary is not None:
        save_tokenizer_json(token_dictionary, output_dir)
    logger.info("pretrained checkpoint written to %s (%.0f s)", output_dir, seconds)
    return PretrainResult(output_dir=output_dir, history=history, seconds=seconds)
