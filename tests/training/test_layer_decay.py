"""Layer-wise learning-rate decay and the learning-rate floor (issue 15): exact rates of a
3-layer model, no weight decay on biases / LayerNorms, the schedule ending at lr_end, and
run.log listing every group's rate."""
from __future__ import annotations

import math

import pytest
import torch

import job_factories as jf
from geneformer_peft.training.arguments import TrainingArguments
from geneformer_peft.training.schedules import layer_index, make_optimizer, make_scheduler
from transformerslocal import BertConfig, BertForSequenceClassification, mark_trainable

LR, D, WD = 1e-3, 0.5, 0.01


def _model(prompt_type: str = "", **extra) -> BertForSequenceClassification:
    config = BertConfig(vocab_size=99, hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
                        intermediate_size=37, max_position_embeddings=64, num_labels=3, prompt_type=prompt_type,
                        num_token=4, **extra)
    model = BertForSequenceClassification(config)
    mark_trainable(model)
    return model


def _expected_rate(name: str) -> float:
    """Written from the rule, independently of schedules.py: N = 3."""
    if name.startswith(("bert.pooler.", "classifier.")):
        return LR
    for i in range(3):
        if name.startswith(f"bert.encoder.layer.{i}."):
            return LR * D ** (3 - i)
    assert name.startswith(("bert.embeddings.", "bert.adapter.")), name
    return LR * D ** 4


def _rates(optimizer) -> dict[int, tuple[float, float]]:
    return {id(p): (g["lr"], g["weight_decay"]) for g in optimizer.param_groups for p in g["params"]}


@pytest.mark.parametrize("prompt_type", ["", "lora", "Gene_token_prompt", "prefix_prompt", "encoder_prompt"])
def test_every_trainable_parameter_gets_its_layers_rate(prompt_type):
    model = _model(prompt_type)
    rates = _rates(make_optimizer(model, lr=LR, weight_decay=WD, layer_decay=D))
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    assert len(rates) == len(trainable)
    for name, param in trainable:
        lr, wd = rates[id(param)]
        assert lr == pytest.approx(_expected_rate(name), rel=1e-12), name
        no_decay = param.ndim == 1 or "LayerNorm" in name
        assert wd == (0.0 if no_decay else WD), name


def test_full_finetuning_rates_of_a_3_layer_model_exactly():
    model = _model("")
    rates = _rates(make_optimizer(model, lr=LR, weight_decay=WD, layer_decay=D))
    params = dict(model.named_parameters())
    assert rates[id(params["classifier.weight"])] == (1e-3, WD)
    assert rates[id(params["bert.pooler.dense.bias"])] == (1e-3, 0.0)
    assert rates[id(params["bert.encoder.layer.2.attention.self.query.weight"])] == (5e-4, WD)
    assert rates[id(params["bert.encoder.layer.1.output.LayerNorm.weight"])] == (2.5e-4, 0.0)
    assert rates[id(params["bert.encoder.layer.0.intermediate.dense.weight"])] == (1.25e-4, WD)
    assert rates[id(params["bert.embeddings.word_embeddings.weight"])] == (6.25e-5, WD)
    assert rates[id(params["bert.embeddings.LayerNorm.bias"])] == (6.25e-5, 0.0)


def test_without_layer_decay_two_groups_at_the_peak_rate():
    optimizer = make_optimizer(_model("lora"), lr=LR, weight_decay=WD)
    assert [(g["lr"], g["weight_decay"]) for g in optimizer.param_groups] == [(LR, WD), (LR, 0.0)]


def test_layer_index_of_peft_names():
    assert layer_index("bert.encoder.layer.3.attention.self.query.lora_A", 12) == 4
    assert layer_index("bert.encoder.layer.11.prompt_embeddings.weight", 12) == 12
    assert layer_index("bert.adapter.D_fc1.weight", 12) == 0
    assert layer_index("classifier.weight", 12) == 13


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
@pytest.mark.parametrize("lr_end", [0.0, 1e-10, 1e-5])
def test_schedule_ends_at_lr_end(schedule, lr_end):
    model = _model("")
    optimizer = make_optimizer(model, lr=LR, weight_decay=WD, layer_decay=D)
    scheduler = make_scheduler(optimizer, 20, warmup_steps=3, schedule=schedule, lr_end=lr_end)
    seen = []
    for _ in range(20):
        optimizer.step()
        scheduler.step()
        seen.append(scheduler.get_last_lr())
    head = [g["name"] for g in optimizer.param_groups].index("head (decay)")
    assert seen[-1][head] == pytest.approx(lr_end, rel=1e-9, abs=1e-18)
    # every group keeps its ratio to the head's rate
    for group, rate in zip(optimizer.param_groups, seen[-1]):
        assert rate == pytest.approx(lr_end * group["lr_scale"], rel=1e-9, abs=1e-18)
    # monotone decay after warmup, never below the floor
    heads = [s[head] for s in seen[3:]]
    assert all(a >= b for a, b in zip(heads, heads[1:])) and min(heads) >= lr_end * (1 - 1e-12)
    if schedule == "linear":  # halfway after warmup: halfway between peak and floor
        assert seen[3 + 7 - 1][head] == pytest.approx(lr_end + (LR - lr_end) * (1 - 7 / 17), rel=1e-9)
    else:
        assert seen[3 + 7 - 1][head] == pytest.approx(
            lr_end + (LR - lr_end) * 0.5 * (1 + math.cos(math.pi * 7 / 17)), rel=1e-9)


def test_bad_settings_name_the_field():
    with pytest.raises(ValueError, match="layer_decay=1.5"):
        TrainingArguments(layer_decay=1.5)
    with pytest.raises(ValueError, match="lr_end=0.1"):
        TrainingArguments(lr=1e-3, lr_end=0.1)
    with pytest.raises(ValueError, match="layer_decay=0"):
        make_optimizer(_model(""), lr=LR, weight_decay=0.0, layer_decay=0.0)


def test_run_log_lists_each_groups_rate_and_the_last_epoch_ends_at_lr_end(job_data, tmp_path):
    out = tmp_path / "out"
    argv = job_data.finetune_argv(out, "--prompt_type", "lora", "--folds", "0", "--layer_decay", "0.5",
                                  "--lr_end", "1e-6", "--early_stopping_patience", "0")
    assert jf.run_finetune(argv) == 0
    run_dir = jf.run_dir(out, "lora", job_data)
    log = (run_dir / "run.log").read_text()
    lr = 3e-3  # FAST_FLAGS
    for name, rate in (("head (decay)", lr), ("layer 1 (decay)", lr * 0.5), ("layer 0 (decay)", lr * 0.25)):
        line = next((ln for ln in log.splitlines() if f"optimizer group {name}" in ln), None)
        assert line is not None, log[-3000:]
        assert float(line.split(" lr ")[1].split()[0]) == pytest.approx(rate, rel=1e-5)
    history = jf.read_json(run_dir / "0" / "history.json")
    # history's "lr" is the first group's rate: LoRA's lowest group is layer 0, at D^2 of the head's
    assert history[-1]["lr"] == pytest.approx(1e-6 * 0.25, rel=1e-9)


@pytest.mark.parametrize("prompt_type", ["", "lora", "Gene_token_prompt"])
def test_scbert_layers_and_embeddings_get_their_own_rates(prompt_type):
    """scBERT's parameters are named ``performer.net.layers.<i>.`` and ``token_emb``: each gets its
    depth's rate (before, every one of them fell through to the head's peak rate)."""
    from transformerslocal import PerformerConfig, PerformerForSequenceClassification
    config = PerformerConfig(num_tokens=7, dim=32, depth=3, heads=4, dim_head=8, max_seq_len=16,
                             num_labels=3, prompt_type=prompt_type, lora_r=4, num_token=4)
    model = PerformerForSequenceClassification(config)
    mark_trainable(model)
    rates = _rates(make_optimizer(model, lr=LR, weight_decay=WD, layer_decay=D))
    seen_depths = set()
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if name.startswith("performer.net.layers."):
            i = int(name.split(".")[3])
            expected = LR * D ** (3 - i)
            seen_depths.add(i)
        elif name.startswith(("token_emb.", "adapter.")):
            expected = LR * D ** 4
            seen_depths.add("embeddings")
        else:
            assert name.startswith(("to_out.", "norm.")), name
            expected = LR
        assert rates[id(param)][0] == pytest.approx(expected, rel=1e-12), name
    assert seen_depths == ({"embeddings"} if prompt_type == "Gene_token_prompt" else
                           {0, 1, 2} | ({"embeddings"} if prompt_type == "" else set()))
