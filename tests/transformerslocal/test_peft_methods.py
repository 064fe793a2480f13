"""Generic tests over the PEFT case table (tests/peft_cases.py): every method and
combination starts equal to the base model, trains exactly its own parameters (the union
over methods, plus the head), adds nothing when switched off, and has the sizes of docs/peft_keys.md §9."""
from __future__ import annotations

import re

import pytest
import torch

from peft_cases import (
    CASE_PARAMS,
    CASES,
    GF_12L_30M,
    METHOD_PREDICATES,
    PEFT_CASE_PARAMS,
    TINY,
    Case,
    base_model,
    batch,
    build,
    from_base,
    is_head,
    is_peft_module,
    logits,
    perturb_peft,
    set_prompts_attended,
    tiny_config,
)
from transformerslocal import (
    PEFT_METHODS,
    BertConfig,
    BertForMaskedLM,
    BertForSequenceClassification,
    BertForTokenClassification,
    BertModel,
    mark_trainable,
    parameter_report,
    trainable_parameter_names,
)


# ----------------------------------------------------------------------------- (a) start = base
@pytest.mark.parametrize("case", CASE_PARAMS)
def test_starts_equal_to_base(case: Case):
    base = base_model(seed=0)
    model = from_base(case, base).eval()
    ids, mask, _ = batch()
    expected = logits(base, ids, mask)
    if not case.has_prefix:
        # LoRA B = 0, adapter D_fc2 = 0: the update is exactly zero
        assert torch.equal(logits(model, ids, mask), expected)
        return
    # Prompts change what gene tokens attend to, so the honest check masks them out as keys:
    # then the prompt positions must be invisible and removed again, leaving the base model.
    # (checked on the gene tokens' last hidden states: at this tiny size and init the classifier
    # shrinks the prompts' effect on the logits to ~1e-4, too close to any fixed tolerance)
    with torch.no_grad():
        prompted = model.bert(ids, mask).last_hidden_state[mask.bool()]
        plain = base.bert(ids, mask).last_hidden_state[mask.bool()]
    assert (prompted - plain).abs().max() > 1e-3, "prompts had no effect"
    set_prompts_attended(model, False)
    torch.testing.assert_close(logits(model, ids, mask), expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize("case", [c for c in CASE_PARAMS if c.values[0].has_prefix])
def test_prompts_masked_out_give_base_hidden_states(case: Case):
    base = base_model(seed=0)
    model = from_base(case, base).eval()
    set_prompts_attended(model, False)
    ids, mask, _ = batch()
    with torch.no_grad():
        got = model.bert(ids, mask, output_hidden_states=True)
        want = base.bert(ids, mask, output_hidden_states=True)
    # gene tokens only, at the right positions: the removed positions were the prompts
    real = mask.bool()
    torch.testing.assert_close(got.last_hidden_state[real], want.last_hidden_state[real], rtol=0, atol=1e-6)
    for g, w in zip(got.hidden_states, want.hidden_states):
        torch.testing.assert_close(g[real], w[real], rtol=0, atol=1e-6)


# ----------------------------------------------------------------------------- (b) what trains
@pytest.mark.parametrize("case", CASE_PARAMS)
def test_mark_trainable_sets_exactly_the_intended_parameters(case: Case):
    model = build(case.config())
    mark_trainable(model)
    names = [n for n, _ in model.named_parameters()]
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    expected = {n for n in names if case.expected_trainable(n)}
    assert trainable == expected
    assert set(trainable_parameter_names(model)) == expected
    for method in case.methods:  # each method really owns parameters
        assert any(not is_head(n) for n in expected), method


@pytest.mark.parametrize("case", PEFT_CASE_PARAMS)
def test_pooler_and_classifier_train(case: Case):
    model = build(case.config())
    mark_trainable(model)
    params = dict(model.named_parameters())
    for name in ("bert.pooler.dense.weight", "bert.pooler.dense.bias", "classifier.weight", "classifier.bias"):
        assert params[name].requires_grad, name
    assert not params["bert.encoder.layer.0.attention.self.query.weight"].requires_grad
    assert not params["bert.embeddings.word_embeddings.weight"].requires_grad


def test_combination_trains_the_union():
    """Regression: the reference froze one method per loop, so with
    ``Gene_token_prompt,lora`` only the last trained and LoRA stayed at B = 0."""
    model = build(tiny_config(prompt_type="Gene_token_prompt,lora"))
    mark_trainable(model)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert "bert.adapter.D_fc1.weight" in trainable
    assert "bert.adapter.D_fc2.weight" in trainable
    for layer in range(TINY["num_hidden_layers"]):
        for proj in ("query", "value"):
            for ab in ("lora_A", "lora_B"):
                assert f"bert.encoder.layer.{layer}.attention.self.{proj}.{ab}" in trainable


def _train_steps(model, steps: int = 2) -> dict[str, torch.Tensor]:
    """``steps`` AdamW steps (lr 1e-2, no weight decay so untouched parameters stay put)
    on a classification loss; returns the parameters from before."""
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.0)
    ids, mask, labels = batch()
    model.train()
    for _ in range(steps):
        optimizer.zero_grad()
        loss = model(ids, attention_mask=mask, labels=labels).loss
        assert loss.item() > 0
        loss.backward()
        optimizer.step()
    return before


@pytest.mark.parametrize("case", CASE_PARAMS)
def test_training_changes_only_and_all_intended_parameters(case: Case):
    # Two steps: LoRA's B and the adapters' D_fc2 start at zero, so A / D_fc1 get a zero
    # gradient on step one (and, with no weight decay, do not move); after step one B and
    # D_fc2 are nonzero, so on step two A and D_fc1 get a gradient too.
    model = from_base(case, base_model(seed=0))
    mark_trainable(model)
    before = _train_steps(model, steps=2)
    changed = {n for n, p in model.named_parameters() if not torch.equal(p.detach(), before[n])}
    expected = {n for n in before if case.expected_trainable(n)}
    assert changed == expected


def test_lora_a_gets_no_gradient_on_the_first_step():
    """Why the test above takes two steps (B = 0 at the start)."""
    model = build(tiny_config(prompt_type="lora"))
    mark_trainable(model)
    before = _train_steps(model, steps=1)
    params = dict(model.named_parameters())
    name = "bert.encoder.layer.0.attention.self.query"
    assert torch.equal(params[name + ".lora_A"].detach(), before[name + ".lora_A"])
    assert not torch.equal(params[name + ".lora_B"].detach(), before[name + ".lora_B"])


@pytest.mark.parametrize("keys", [
    pytest.param(dict(prompt_type="lora,prefix_prompt,Gene_token_prompt,encoder_prompt"), id="scpeft_four"),
    pytest.param(dict(prompt_type="dora,ia3,prefix_prompt,Gene_token_prompt,encoder_prompt",
                      lora_target_modules=["query"]), id="dora_ia3_and_three"),
])
@pytest.mark.parametrize("model_class, head", [
    (BertModel, ("pooler.",)),
    (BertForTokenClassification, ("classifier.",)),
    (BertForMaskedLM, ("cls.",)),
])
def test_other_models_train_their_head_and_methods(model_class, head, keys):
    config = tiny_config(**keys)
    model = build(config, model_class=model_class)
    mark_trainable(model)
    for name, param in model.named_parameters():
        bare = name if name.startswith(("bert.", "cls.", "classifier.")) else "bert." + name
        expected = name.startswith(head) or is_peft_module(bare)
        assert param.requires_grad == expected, name


# ----------------------------------------------------------------------------- the equations (docs/peft_keys.md §3)
def test_adapters_follow_the_spec_equations():
    """A slow, readable reference of docs/peft_keys.md §3.3, §3.4 against the model's forward."""
    F = torch.nn.functional
    model = build(tiny_config(prompt_type="Gene_token_prompt,encoder_prompt", mlp_adapter_scale=0.7)).eval()
    perturb_peft(model, std=0.3)

    def adapter(module, h):  # h -> D_fc2(GELU(D_fc1(h)))
        return F.linear(F.gelu(F.linear(h, module.D_fc1.weight, module.D_fc1.bias)),
                        module.D_fc2.weight, module.D_fc2.bias)

    ids, mask, _ = batch()
    with torch.no_grad():
        e = model.bert.embeddings(ids)
        torch.testing.assert_close(model.bert.embed(ids), e + adapter(model.bert.adapter, e), rtol=0, atol=1e-6)

        layer = model.bert.encoder.layer[0]
        x = torch.randn(3, 6, TINY["hidden_size"])
        ctx, _ = layer.attention.self(x)
        a = layer.attention.output.dense(ctx)
        h = layer.attention.output.LayerNorm(a + adapter(layer.attention.Space_Adapter, a) + x)
        f = layer.output.dense(layer.intermediate(h))
        want = layer.output.LayerNorm(f + 0.7 * adapter(layer.MLP_Adapter, h) + h)
        got, _ = layer(x)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)


def test_lora_follows_the_spec_equation():
    model = build(tiny_config(prompt_type="lora", lora_r=4, lora_alpha=2)).eval()
    perturb_peft(model, std=0.3)
    query = model.bert.encoder.layer[1].attention.self.query
    x = torch.randn(3, 6, TINY["hidden_size"])
    with torch.no_grad():
        want = x @ query.weight.T + query.bias + (2 / 4) * (x @ query.lora_A.T @ query.lora_B.T)
        torch.testing.assert_close(query(x), want, rtol=0, atol=1e-6)


def test_ia3_follows_the_equation():
    """docs/peft_keys.md §3.5: key, value scale their output (bias included); both output.dense
    projections (attention output and feed-forward output) scale their input."""
    model = build(tiny_config(prompt_type="ia3")).eval()
    perturb_peft(model, std=0.3)
    layer = model.bert.encoder.layer[1]
    x = torch.randn(3, 6, TINY["hidden_size"])
    x_ffn = torch.randn(3, 6, TINY["intermediate_size"])
    with torch.no_grad():
        for proj in (layer.attention.self.key, layer.attention.self.value):
            assert proj.ia3_l.shape == (TINY["hidden_size"],)
            torch.testing.assert_close(proj(x), (x @ proj.weight.T + proj.bias) * proj.ia3_l, rtol=0, atol=1e-6)
        for proj, inp in ((layer.attention.output.dense, x), (layer.output.dense, x_ffn)):
            assert proj.ia3_l.shape == (inp.shape[-1],)
            torch.testing.assert_close(proj(inp), (inp * proj.ia3_l) @ proj.weight.T + proj.bias, rtol=0, atol=1e-6)
    assert type(layer.attention.self.query) is torch.nn.Linear
    assert type(layer.intermediate.dense) is torch.nn.Linear


def test_dora_follows_the_equation():
    """docs/peft_keys.md §3.6: W' = m / ||W + s B A|| (row-wise) * (W + s B A), s = alpha / r."""
    model = build(tiny_config(prompt_type="dora", lora_r=4, lora_alpha=2)).eval()
    perturb_peft(model, std=0.3)
    value = model.bert.encoder.layer[1].attention.self.value
    x = torch.randn(3, 6, TINY["hidden_size"])
    with torch.no_grad():
        direction = value.weight + (2 / 4) * value.dora_B @ value.dora_A
        weight = value.dora_magnitude[:, None] * direction / direction.norm(dim=1, keepdim=True)
        torch.testing.assert_close(value(x), x @ weight.T + value.bias, rtol=0, atol=1e-6)


def test_dora_magnitude_starts_at_the_loaded_weight_norm():
    """A base checkpoint has no magnitude: it starts at ||W|| of the weights loaded, not of
    the random ones the model was built with (else the start would not equal the base)."""
    base = base_model(seed=0)
    model = from_base(Case("dora", dict(prompt_type="dora"), ("dora",)), base, seed=5)
    for i in range(TINY["num_hidden_layers"]):
        for proj in ("query", "value"):
            got = getattr(model.bert.encoder.layer[i].attention.self, proj)
            want = getattr(base.bert.encoder.layer[i].attention.self, proj).weight.norm(dim=1)
            torch.testing.assert_close(got.dora_magnitude.detach(), want, rtol=0, atol=1e-6)
    assert "bert.encoder.layer.0.attention.self.query.dora_magnitude" in model.loading_info["missing_keys"]


# ----------------------------------------------------------------------------- (c) switched off
def test_switched_off_methods_add_nothing():
    plain = build(tiny_config())
    for prompt_type in ("lora", "prefix_prompt", "Gene_token_prompt", "encoder_prompt",
                        "lora,prefix_prompt,Gene_token_prompt,encoder_prompt", "ia3", "dora",
                        "ia3,dora,prefix_prompt,Gene_token_prompt,encoder_prompt"):
        off = build(tiny_config(prompt_type=prompt_type, if_use_prompt=False))
        assert list(off.state_dict()) == list(plain.state_dict()), prompt_type
        assert [n for n, _ in off.named_parameters()] == [n for n, _ in plain.named_parameters()]
        assert parameter_report(off).total == parameter_report(plain).total


@pytest.mark.parametrize("case", PEFT_CASE_PARAMS)
def test_methods_add_only_their_own_keys(case: Case):
    plain_keys = set(build(tiny_config()).state_dict())
    keys = set(build(case.config()).state_dict())
    assert plain_keys <= keys
    added = keys - plain_keys
    assert added and all(is_peft_module(k) for k in added)
    for method in METHOD_PREDICATES:  # the four of scPEFT, ia3, dora
        owns = any(METHOD_PREDICATES[method](k) for k in added)
        assert owns == (method in case.methods), method


def test_layer_confs_build_modules_only_where_asked():
    keys = set(build(tiny_config(prompt_type="encoder_prompt", space_adapter_conf=[0, 1],
                                 mlp_adapter_conf=[1, 0])).state_dict())
    assert not any(k.startswith("bert.encoder.layer.0.attention.Space_Adapter") for k in keys)
    assert any(k.startswith("bert.encoder.layer.1.attention.Space_Adapter") for k in keys)
    assert any(k.startswith("bert.encoder.layer.0.MLP_Adapter") for k in keys)
    assert not any(k.startswith("bert.encoder.layer.1.MLP_Adapter") for k in keys)
    keys = set(build(tiny_config(prompt_type="prefix_prompt", n_layers_conf=[0, 1])).state_dict())
    assert [k for k in keys if "prompt" in k] == ["bert.encoder.layer.1.prompt_embeddings.weight"]


# ----------------------------------------------------------------------------- (d) sizes (docs/peft_keys.md §9)
def _peft_count_12l(**peft_keys) -> tuple[int, int]:
    """(added parameters vs plain BERT, trainable parameters without the head) at 12L-30M."""
    with torch.device("meta"):  # shapes only: no memory, no init time
        plain = BertForSequenceClassification(BertConfig(**GF_12L_30M))
        model = BertForSequenceClassification(BertConfig(**GF_12L_30M, **peft_keys))
    added = sum(p.numel() for p in model.parameters()) - sum(p.numel() for p in plain.parameters())
    mark_trainable(model)
    trainable = sum(p.numel() for n, p in model.named_parameters() if p.requires_grad and not is_head(n))
    return added, trainable


@pytest.mark.parametrize("peft_keys, expected", [
    pytest.param(dict(prompt_type="lora", lora_r=8), 196_608, id="lora_r8_qv"),
    pytest.param(dict(prompt_type="encoder_prompt", mlp_adapter_conf=[0] * 12), 1_580_544, id="space_adapters"),
    pytest.param(dict(prompt_type="Gene_token_prompt"), 131_712, id="token_adapter"),
    pytest.param(dict(prompt_type="prefix_prompt", num_token=64), 32_768, id="prompts_64x1"),
    # key, value: 512 each (output scaled); attention.output.dense 512, output.dense 1024 (input)
    pytest.param(dict(prompt_type="ia3"), 12 * (512 + 512 + 512 + 1024), id="ia3_default"),
    # LoRA's 196,608 plus one magnitude per output feature of Q and V
    pytest.param(dict(prompt_type="dora", lora_r=8), 196_608 + 12 * 2 * 512, id="dora_r8_qv"),
])
def test_parameter_counts_match_the_spec_at_12l_30m(peft_keys, expected):
    assert _peft_count_12l(**peft_keys) == (expected, expected)


# ----------------------------------------------------------------------------- (e) report
def test_parameter_report_counts_and_percent():
    model = build(tiny_config(prompt_type="lora"))
    report = mark_trainable(model)
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert (report.trainable, report.total) == (trainable, total)
    assert report == parameter_report(model)
    assert report.percent == pytest.approx(100.0 * trainable / total)
    assert 0 < report.percent < 100
    text = str(report)
    assert f"{trainable:,}" in text and f"{total:,}" in text
    assert re.search(r"\d+\.\d+%", text)
    assert report.to_dict() == {"trainable_parameters": trainable, "total_parameters": total,
                                "trainable_percent": report.percent}


def test_parameter_report_counts_tied_weights_once():
    model = build(tiny_config(), model_class=BertForMaskedLM)
    unique = {id(p): p.numel() for p in model.parameters()}
    assert parameter_report(model).total == sum(unique.values())
    assert parameter_report(model).total < sum(p.numel() for p in model.state_dict().values())


def test_full_fine_tuning_reports_everything_trainable():
    model = build(tiny_config())
    report = mark_trainable(model)
    assert report.trainable == report.total and report.percent == 100.0


# ----------------------------------------------------------------------------- bad configs
@pytest.mark.parametrize("keys, key, value", [
    (dict(prompt_type="lora,adapter"), "prompt_type", "adapter"),
    (dict(prompt_type="prefix_prompt", n_layers_conf=[1, 0, 0]), "n_layers_conf", "[1, 0, 0]"),
    (dict(prompt_type="encoder_prompt", mlp_adapter_conf=[1]), "mlp_adapter_conf", "[1]"),
    (dict(prompt_type="encoder_prompt", space_adapter_conf=[1, 1, 1]), "space_adapter_conf", "[1, 1, 1]"),
    (dict(prompt_type="lora", lora_r=0), "lora_r", "0"),
    (dict(prompt_type="prefix_prompt", num_token=0), "num_token", "0"),
])
def test_bad_config_raises_naming_key_and_value(keys, key, value):
    with pytest.raises(ValueError, match=re.escape(key)) as err:
        tiny_config(**keys)
    assert value in str(err.value)


def test_case_table_covers_every_method_and_combination():
    ids = {c.id for c in CASES}
    assert {"full", "lora", "prefix_prompt", "Gene_token_prompt", "encoder_prompt", "ia3", "dora"} <= ids
    assert any(len(c.methods) == 4 for c in CASES)
    assert set(METHOD_PREDICATES) == set(PEFT_METHODS)
    for method in PEFT_METHODS:  # alone, and with another method
        assert any(c.methods == (method,) for c in CASES), method
        assert any(method in c.methods and len(c.methods) > 1 for c in CASES), method
