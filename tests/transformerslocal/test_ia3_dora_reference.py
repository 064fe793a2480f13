"""IA3 and DoRA parity with HuggingFace ``peft`` on HF ``transformers`` BERT: the same base
weights and the same (nonzero) method parameters give the same logits, and one identical SGD
step on the same batch and loss moves both to the same model (docs/peft_keys.md §3.5, §3.6)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

transformers = pytest.importorskip("transformers", reason="the reference is HF transformers + peft")
hf_peft = pytest.importorskip("peft", reason="the reference is HuggingFace peft")

from bert_factories import perturb_  # noqa: E402
from peft_cases import TINY, batch, build, is_head, is_peft_module, perturb_peft, tiny_config  # noqa: E402
from transformerslocal import mark_trainable  # noqa: E402
from transformerslocal.peft.dora import DoRALinear  # noqa: E402
from transformerslocal.peft.ia3 import IA3Linear  # noqa: E402

HF_PREFIX = "base_model.model."
LR = 0.5  # SGD: the update is the gradient itself, so the two steps agree to rounding


def hf_config():
    keys = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
            "max_position_embeddings", "hidden_act", "hidden_dropout_prob", "attention_probs_dropout_prob",
            "num_labels")
    return transformers.BertConfig(**{k: TINY[k] for k in keys})


def ours_and_hf(keys: dict, peft_config):
    """Our model (every parameter perturbed, as if trained) and peft's on the same weights."""
    ours = build(tiny_config(**keys))
    perturb_(ours, seed=3, scale=0.1)  # every parameter: O(1) logits, no zero biases
    perturb_peft(ours, std=0.5)  # the method's own far from its start, so that it matters
    state = ours.state_dict()
    torch.manual_seed(0)
    hf = transformers.BertForSequenceClassification(hf_config())
    missing, unexpected = hf.load_state_dict({k: v for k, v in state.items() if not is_peft_module(k)}, strict=False)
    assert not unexpected
    assert all("position_ids" in k or "token_type_ids" in k for k in missing), missing
    return ours, state, hf_peft.get_peft_model(hf, peft_config)


def hf_logits(hf, ids, mask, **kw):
    return hf(input_ids=ids, attention_mask=mask, **kw)


def one_sgd_step(model, params, ids, mask, labels, forward):
    optimizer = torch.optim.SGD(params, lr=LR)
    model.train()
    optimizer.zero_grad()
    F.cross_entropy(forward(model, ids, mask).logits, labels).backward()
    optimizer.step()
    model.eval()


def train_same_parameters(ours, hf):
    """Ours: the method and the head (mark_trainable). peft: its adapter parameters, plus the
    same head unfrozen by hand (peft freezes it without a task type)."""
    mark_trainable(ours)
    for name, param in hf.named_parameters():
        if is_head(name.removeprefix(HF_PREFIX)):
            param.requires_grad_(True)
    ours_names = {n for n, p in ours.named_parameters() if p.requires_grad}
    hf_names = {n for n, p in hf.named_parameters() if p.requires_grad}
    assert len(ours_names) == len(hf_names)
    return [p for p in ours.parameters() if p.requires_grad], [p for p in hf.parameters() if p.requires_grad]


def assert_same_model(ours, hf, ids, mask):
    with torch.no_grad():
        want = hf_logits(hf, ids, mask, output_hidden_states=True)
        got = ours(ids, attention_mask=mask, output_hidden_states=True)
    torch.testing.assert_close(got.logits, want.logits, rtol=0, atol=1e-5)
    real = mask.bool()
    torch.testing.assert_close(got.hidden_states[-1][real], want.hidden_states[-1][real], rtol=1e-5, atol=2e-5)
    return got.logits


# ----------------------------------------------------------------------------- IA3
IA3_VARIANTS = [
    pytest.param(["key", "value", "output.dense"], ["output.dense"], id="peft_bert_default"),
    pytest.param(["query", "intermediate.dense"], ["intermediate.dense"], id="query_intermediate_ff"),
    pytest.param(["key", "attention.output.dense"], [], id="attention_output_not_ff"),
]


def copy_ia3(hf, state) -> dict[str, bool]:
    """Copy our ``ia3_l`` into peft's; returns wrapped module -> is_feedforward."""
    wrapped = {}
    with torch.no_grad():
        for name, module in hf.named_modules():
            if isinstance(module, hf_peft.tuners.ia3.IA3Layer):
                ours_name = name.removeprefix(HF_PREFIX)
                param = module.ia3_l["default"]
                param.copy_(state[ours_name + ".ia3_l"].view_as(param))
                wrapped[ours_name] = module.is_feedforward
    return wrapped


@pytest.mark.parametrize("targets, feedforward", IA3_VARIANTS)
def test_ia3_matches_peft(targets, feedforward):
    ours, state, hf = ours_and_hf(
        dict(prompt_type="ia3", ia3_target_modules=targets, ia3_feedforward_modules=feedforward),
        hf_peft.IA3Config(target_modules=targets, feedforward_modules=feedforward))
    wrapped = copy_ia3(hf, state)
    # the same modules, scaled on the same side (for BERT "output.dense" selects both the
    # attention output and the feed-forward output, as in peft)
    ours_wrapped = {n: m.feedforward for n, m in ours.named_modules() if isinstance(m, IA3Linear)}
    assert wrapped == ours_wrapped and wrapped
    if targets == ["key", "value", "output.dense"]:
        assert wrapped["bert.encoder.layer.0.attention.output.dense"] is True
        assert wrapped["bert.encoder.layer.0.output.dense"] is True
        assert wrapped["bert.encoder.layer.0.attention.self.key"] is False

    ids, mask, labels = batch()
    ours.eval()
    hf.eval()
    before = assert_same_model(ours, hf, ids, mask)
    with torch.no_grad(), hf.disable_adapter():
        base_only = hf_logits(hf, ids, mask).logits
    assert (base_only - before).abs().max() > 1e-2  # the scaling matters

    ours_params, hf_params = train_same_parameters(ours, hf)
    one_sgd_step(ours, ours_params, ids, mask, labels, lambda m, i, k: m(i, attention_mask=k))
    one_sgd_step(hf, hf_params, ids, mask, labels, hf_logits)
    after = assert_same_model(ours, hf, ids, mask)
    assert (after - before).abs().max() > 1e-3  # the step moved the model


# ----------------------------------------------------------------------------- DoRA
DORA_VARIANTS = [
    pytest.param(8, 1, ["query", "value"], id="r8_alpha1_qv"),
    pytest.param(4, 16, ["query", "key", "value"], id="r4_alpha16_qkv"),
]


def copy_dora(hf, state, r, alpha) -> int:
    copied = 0
    with torch.no_grad():
        for name, module in hf.named_modules():
            if isinstance(module, hf_peft.tuners.lora.LoraLayer):
                ours_name = name.removeprefix(HF_PREFIX)
                assert module.scaling["default"] == pytest.approx(alpha / r)
                module.lora_A["default"].weight.copy_(state[ours_name + ".dora_A"])
                module.lora_B["default"].weight.copy_(state[ours_name + ".dora_B"])
                module.lora_magnitude_vector["default"].weight.copy_(state[ours_name + ".dora_magnitude"])
                copied += 1
    return copied


@pytest.mark.parametrize("r, alpha, targets", DORA_VARIANTS)
def test_dora_matches_peft(r, alpha, targets):
    ours, state, hf = ours_and_hf(
        dict(prompt_type="dora", lora_r=r, lora_alpha=alpha, lora_target_modules=targets),
        hf_peft.LoraConfig(r=r, lora_alpha=alpha, target_modules=targets, lora_dropout=0.0, use_dora=True))
    assert copy_dora(hf, state, r, alpha) == len(targets) * TINY["num_hidden_layers"]
    assert sum(isinstance(m, DoRALinear) for m in ours.modules()) == len(targets) * TINY["num_hidden_layers"]

    ids, mask, labels = batch()
    ours.eval()
    hf.eval()
    before = assert_same_model(ours, hf, ids, mask)
    with torch.no_grad(), hf.disable_adapter():
        base_only = hf_logits(hf, ids, mask).logits
    assert (base_only - before).abs().max() > 1e-2

    ours_params, hf_params = train_same_parameters(ours, hf)
    one_sgd_step(ours, ours_params, ids, mask, labels, lambda m, i, k: m(i, attention_mask=k))
    one_sgd_step(hf, hf_params, ids, mask, labels, hf_logits)
    after = assert_same_model(ours, hf, ids, mask)
    assert (after - before).abs().max() > 1e-3
    # the magnitude and the direction moved alike (the weight norm is detached in both)
    hf_state = {k.removeprefix(HF_PREFIX): v for k, v in hf.state_dict().items()}
    for name, module in ours.named_modules():
        if isinstance(module, DoRALinear):
            torch.testing.assert_close(module.dora_magnitude.detach(),
                                       hf_state[name + ".lora_magnitude_vector.default.weight"], rtol=0, atol=1e-6)
            torch.testing.assert_close(module.dora_B.detach(), hf_state[name + ".lora_B.default.weight"],
                                       rtol=0, atol=1e-6)


def test_dora_magnitude_starts_as_peft_initialises_it():
    """Wrapping the same pretrained layer, peft and we start the magnitude at ||W|| (per row)."""
    ours, state, hf = ours_and_hf(dict(prompt_type="dora"),
                                  hf_peft.LoraConfig(r=8, lora_alpha=1, target_modules=["query", "value"],
                                                     use_dora=True))
    fresh = build(tiny_config(prompt_type="dora"), seed=9)
    fresh.load_checkpoint_state({k: v for k, v in state.items() if ".dora_" not in k}, report_missing=False)
    hf_state = {k.removeprefix(HF_PREFIX): v for k, v in hf.state_dict().items()}
    for name, module in fresh.named_modules():
        if isinstance(module, DoRALinear):
            torch.testing.assert_close(module.dora_magnitude.detach(),
                                       hf_state[name + ".lora_magnitude_vector.default.weight"], rtol=0, atol=1e-6)


def test_parameter_report_matches_peft():
    """Trainable counts without the head equal peft's for the same targets."""
    for keys, peft_config in [
        (dict(prompt_type="ia3"), hf_peft.IA3Config(target_modules=["key", "value", "output.dense"],
                                                    feedforward_modules=["output.dense"])),
        (dict(prompt_type="dora"), hf_peft.LoraConfig(r=8, target_modules=["query", "value"], use_dora=True)),
    ]:
        ours, _, hf = ours_and_hf(keys, peft_config)
        mark_trainable(ours)
        ours_count = sum(p.numel() for n, p in ours.named_parameters() if p.requires_grad and not is_head(n))
        hf_count, _ = hf.get_nb_trainable_parameters()
        assert ours_count == hf_count, keys
