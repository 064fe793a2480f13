"""Scale paths: frozen-prefix caching, DDP on CPU (gloo), bf16 autocast, gradient checkpointing."""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

import job_factories as jf
from geneformer_peft.data.cells import EncodedCells, collate_cells
from geneformer_peft.data.dataset_io import load_saved_dataset
from geneformer_peft.training.frozen_cache import FrozenPrefixCache, frozen_prefix_depth
from geneformer_peft.training.trainer import FoldTrainer, make_sampler
from geneformer_peft.training.arguments import TrainingArguments
from transformerslocal import BertConfig, BertForSequenceClassification, mark_trainable

TINY = dict(vocab_size=60, hidden_size=32, num_hidden_layers=4, num_attention_heads=4, intermediate_size=37,
            max_position_embeddings=64, num_labels=3)


def _cells(n=24, seed=0):
    rng = np.random.default_rng(seed)
    lengths = rng.integers(5, 40, size=n)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    flat = rng.integers(2, TINY["vocab_size"], size=offsets[-1]).astype(np.int32)
    labels = rng.integers(0, 3, size=n)
    return EncodedCells(flat, offsets, labels=labels, name="train")


def _model(**overrides):
    torch.manual_seed(0)
    model = BertForSequenceClassification(BertConfig(**{**TINY, **overrides}))
    mark_trainable(model)
    return model


@pytest.mark.parametrize("overrides, depth", [
    (dict(freeze_layers=2), 2),
    (dict(prompt_type="encoder_prompt", space_adapter_conf=[0, 0, 0, 1], mlp_adapter_conf=[0, 0, 0, 1]), 3),
    (dict(prompt_type="lora"), 0),
    (dict(prompt_type="prefix_prompt"), 0),  # prompts enter at layer 0
    (dict(prompt_type="prefix_prompt", n_layers_conf=[0, 1, 0, 0]), 1),
])
def test_frozen_prefix_depth(overrides, depth):
    assert frozen_prefix_depth(_model(**overrides)) == depth


@pytest.mark.parametrize("overrides", [
    dict(freeze_layers=2),
    dict(prompt_type="encoder_prompt", space_adapter_conf=[0, 0, 1, 1], mlp_adapter_conf=[0, 0, 0, 1]),
    dict(prompt_type="prefix_prompt", n_layers_conf=[0, 0, 1, 0]),
])
def test_cached_forward_equals_uncached_in_eval(overrides):
    model = _model(**overrides).eval()
    cells = _cells()
    cache = FrozenPrefixCache.for_model(model)
    assert cache is not None
    batch = collate_cells([cells[i] for i in range(8)])
    with torch.no_grad():
        reference = model(batch["input_ids"], batch["attention_mask"]).logits
        first = cache.forward(model, batch, torch.device("cpu"))    # computes and stores
        second = cache.forward(model, batch, torch.device("cpu"))   # served from the cache
    assert cache.misses == 8 and cache.hits == 8
    torch.testing.assert_close(first, reference, rtol=0, atol=1e-6)
    torch.testing.assert_close(second, reference, rtol=0, atol=1e-6)


def test_cache_served_batches_regroup_cells():
    """Cells cached in one batch composition are served correctly in another (other padding)."""
    model = _model(freeze_layers=2).eval()
    cells = _cells()
    cache = FrozenPrefixCache.for_model(model)
    with torch.no_grad():
        cache.forward(model, collate_cells([cells[i] for i in range(12)]), torch.device("cpu"))
        mixed = collate_cells([cells[i] for i in (11, 0, 5)])
        served = cache.forward(model, mixed, torch.device("cpu"))
        reference = model(mixed["input_ids"], mixed["attention_mask"]).logits
    torch.testing.assert_close(served, reference, rtol=0, atol=1e-6)


def test_timed_cache_counts_only_computed_rows():
    model = _model(freeze_layers=2).eval()
    cells = _cells()
    batch = collate_cells([cells[i] for i in range(8)])
    untimed, timed = FrozenPrefixCache.for_model(model), FrozenPrefixCache.for_model(model, timed=True)
    with torch.no_grad():
        untimed.forward(model, batch, torch.device("cpu"))
        timed.forward(model, batch, torch.device("cpu"))
        computed = timed.compute_seconds
        timed.forward(model, batch, torch.device("cpu"))  # all rows cached: nothing computed
    assert untimed.compute_seconds == 0.0
    assert computed > 0 and timed.compute_seconds == computed


def test_cache_budget_is_respected():
    model = _model(freeze_layers=2).eval()
    cells = _cells()
    cache = FrozenPrefixCache(2, budget_bytes=4 * 32 * 30)  # room for ~30 tokens of hidden 32 in fp32
    with torch.no_grad():
        cache.forward(model, collate_cells([cells[i] for i in range(8)]), torch.device("cpu"))
    assert cache.used_bytes <= cache.budget_bytes
    assert len(cache.store[cells.key]) < 8


def test_training_with_cache_matches_training_without():
    """With dropout off, the frozen prefix behaves the same cached or not: same trajectory."""
    args = TrainingArguments(epochs=3, batch_size=6, lr=5e-3, progress=False, early_stopping_patience=0)
    results = []
    for use_cache in (False, True):
        model = _model(freeze_layers=2, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
        cache = FrozenPrefixCache.for_model(model) if use_cache else None
        trainer = FoldTrainer(model, _cells(seed=1), _cells(n=10, seed=2), args, class_weights=None,
                              device=torch.device("cpu"), encoder_cache=cache)
        fit = trainer.fit()
        results.append(([h["val_loss"] for h in fit.history], model.classifier.weight.detach().clone()))
        if use_cache:
            assert cache.hits > 0
    np.testing.assert_allclose(results[0][0], results[1][0], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(results[0][1], results[1][1], rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize("sampler", ["length", "random", "balanced"])
def test_distributed_samplers_give_ranks_disjoint_cells(sampler):
    cells = _cells(n=40)
    args = TrainingArguments(batch_size=4, sampler=sampler, seed=3)
    shards = []
    for rank in (0, 1):
        s = make_sampler(cells, args, num_replicas=2, rank=rank)
        s.set_epoch(1)
        shards.append(list(s))
    assert len(shards[0]) == len(shards[1]) == 20
    if sampler == "balanced":
        # draws with replacement: the ranks split one shared draw of 40 positions
        whole = make_sampler(cells, args)
        whole.set_epoch(1)
        assert sorted(shards[0] + shards[1]) == sorted(list(whole))
    else:
        assert not set(shards[0]) & set(shards[1])
        assert sorted(shards[0] + shards[1]) == list(range(40))


def test_ddp_two_cpu_processes_run_a_fold(job_data, tmp_path):
    """torchrun with 2 processes (gloo): the fold trains, rank 0 writes the outputs once."""
    out = tmp_path / "ddp"
    argv = job_data.finetune_argv(out, "--prompt_type", "lora", "--folds", "0")
    env = jf._subprocess_env()
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         str(jf.SCRIPT), *argv], capture_output=True, text=True, timeout=300, env=env, cwd=jf.ROOT)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "rank 1 of 2" in proc.stderr and "rank 0 of 2" in proc.stderr
    fold_dir = jf.run_dir(out, "lora", job_data) / "0"
    metrics = json.loads((fold_dir / "metrics.json").read_text())
    assert metrics["n_cells"] == len(load_saved_dataset(job_data.fold_file(0, "test")))
    assert (fold_dir / "fold_done.json").is_file()
    assert not list(fold_dir.parent.glob("0.tmp-*"))


def test_bf16_autocast_on_cpu_gives_close_logits():
    model = _model(prompt_type="lora").eval()
    batch = collate_cells([_cells()[i] for i in range(6)])
    with torch.no_grad():
        reference = model(batch["input_ids"], batch["attention_mask"]).logits
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = model(batch["input_ids"], batch["attention_mask"]).logits
    assert low.dtype == torch.bfloat16
    torch.testing.assert_close(low.float(), reference, rtol=0.05, atol=0.02)


def test_bf16_and_checkpointing_training_runs_on_cpu():
    args = TrainingArguments(epochs=2, batch_size=6, lr=5e-3, progress=False, precision="bf16",
                             gradient_checkpointing=True)
    model = _model(prompt_type="lora")
    model.gradient_checkpointing_enable()
    before = model.bert.encoder.layer[0].attention.self.query.lora_B.detach().clone()
    fit = FoldTrainer(model, _cells(seed=1), _cells(n=10, seed=2), args, class_weights=None,
                      device=torch.device("cpu")).fit()
    assert fit.epochs_run == 2 and all(np.isfinite(h["train_loss"]) for h in fit.history)
    assert not torch.equal(before, model.bert.encoder.layer[0].attention.self.query.lora_B)
