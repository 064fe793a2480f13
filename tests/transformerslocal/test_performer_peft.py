"""The PEFT methods on the scBERT Performer (docs/scbert.md "PEFT"), through the same
``prompt_type`` keys and method modules as the BERT: the generic case table (start equals
base; only intended parameters change after steps; PEFT-only save/load exact), the projection
name map, merging, and the ``freeze_preset: "scbert"`` recipe.

Which parameters must train is written here from the Performer's names, independently of
``transformerslocal.peft.trainable``.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import pytest
import torch

import transformerslocal as tl
from transformerslocal.peft import load_peft_model, mark_trainable, merge_peft, parameter_report, save_peft_weights
from transformerslocal.peft.dora import DoRALinear
from transformerslocal.peft.ia3 import IA3Linear
from transformerslocal.peft.lora import LoRALinear
from performer_factories import TINY

SIZES = dict(TINY, feature_redraw_interval=None, num_labels=3, classifier_hidden_sizes=[16, 8])

PREDICATES = {
    "lora": lambda n: n.endswith((".lora_A", ".lora_B")),
    "dora": lambda n: n.endswith((".dora_A", ".dora_B", ".dora_magnitude")),
    "ia3": lambda n: n.endswith(".ia3_l"),
    "Gene_token_prompt": lambda n: n.startswith("adapter."),
    "encoder_prompt": lambda n: ".Space_Adapter." in n or ".MLP_Adapter." in n,
}
SCALE_LIKE = (".ia3_l", ".dora_magnitude")


def is_peft(name: str) -> bool:
    return any(p(name) for p in PREDICATES.values())


@dataclass(frozen=True)
class Case:
    id: str
    overrides: dict = field(default_factory=dict)
    methods: tuple[str, ...] = ()

    def config(self, **extra) -> tl.PerformerConfig:
        return tl.PerformerConfig(**{**SIZES, **self.overrides, **extra})

    def expected_trainable(self, name: str) -> bool:
        if not self.methods:
            if self.overrides.get("freeze_preset") == "scbert":  # depth 2: layer depth-2 = 0
                return name.startswith(("norm.", "performer.net.layers.0.", "to_out."))
            if self.overrides.get("freeze_layers"):
                return not name.startswith(("token_emb.", "performer.net.layers.0."))
            return True
        return name.startswith("to_out.") or any(PREDICATES[m](name) for m in self.methods)


CASES = [
    Case("full"),
    Case("full_freeze1", dict(freeze_layers=1)),
    Case("scbert_preset", dict(freeze_preset="scbert")),
    Case("lora", dict(prompt_type="lora"), ("lora",)),
    Case("lora_qkv", dict(prompt_type="lora", lora_target_modules=["query", "key", "value"], lora_r=4,
                          lora_alpha=8), ("lora",)),
    Case("dora", dict(prompt_type="dora"), ("dora",)),
    Case("ia3", dict(prompt_type="ia3"), ("ia3",)),
    Case("ia3_w1", dict(prompt_type="ia3", ia3_target_modules=["query", "intermediate.dense"],
                        ia3_feedforward_modules=["intermediate.dense"]), ("ia3",)),
    Case("Gene_token_prompt", dict(prompt_type="Gene_token_prompt"), ("Gene_token_prompt",)),
    Case("encoder_prompt", dict(prompt_type="encoder_prompt"), ("encoder_prompt",)),
    Case("encoder_one_layer", dict(prompt_type="encoder_prompt", space_adapter_conf=[0, 1],
                                   mlp_adapter_conf=[1, 0]), ("encoder_prompt",)),
    Case("lora+gene_token+encoder", dict(prompt_type="lora,Gene_token_prompt,encoder_prompt"),
         ("lora", "Gene_token_prompt", "encoder_prompt")),
    Case("dora+ia3", dict(prompt_type="dora,ia3", lora_target_modules=["query"],
                          ia3_target_modules=["key", "output.dense"]), ("dora", "ia3")),
    Case("switched_off", dict(prompt_type="lora,encoder_prompt", if_use_prompt=False)),
]
PARAMS = [pytest.param(c, id=c.id) for c in CASES]
PEFT_PARAMS = [pytest.param(c, id=c.id) for c in CASES if c.methods]


def base_model(cls=tl.PerformerForSequenceClassification):
    """A plain scBERT with random, perturbed weights: the "pretrained" model."""
    torch.manual_seed(0)
    model = cls(tl.PerformerConfig(**SIZES), warn_random_positions=False)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.1)
    return model.eval()


def from_base(case: Case, base, **extra):
    torch.manual_seed(5)
    model = type(base)(case.config(**extra), warn_random_positions=False)
    model.load_checkpoint_state(base.state_dict(), report_missing=False)
    return model.eval()


@torch.no_grad()
def perturb_peft(model, seed: int = 7) -> None:
    gen = torch.Generator().manual_seed(seed)
    for name, param in model.named_parameters():
        if is_peft(name) or name.startswith("to_out."):
            noise = torch.randn(param.shape, generator=gen) * 0.1
            param.add_(noise) if name.endswith(SCALE_LIKE) or name.startswith("to_out.") else param.copy_(noise)


def tokens(n: int = 3, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 6, (n, SIZES["max_seq_len"]), generator=gen)
    ids[:, -1] = 0
    return ids


@pytest.fixture(scope="module")
def base():
    return base_model()


@pytest.mark.parametrize("case", PARAMS)
def test_start_equals_base(case, base):
    model = from_base(case, base)
    assert model.loading_info["missing_keys"] == sorted(
        n for n in model.state_dict() if is_peft(n) and case.methods), "only PEFT keys are new"
    ids = tokens()
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, base(ids).logits, rtol=0, atol=1e-6)


@pytest.mark.parametrize("case", PARAMS)
def test_trainable_set_and_only_intended_parameters_change(case, base):
    model = from_base(case, base)
    report = mark_trainable(model)
    names = [n for n, _ in model.named_parameters()]
    expected = {n for n in names if case.expected_trainable(n)}
    assert {n for n, p in model.named_parameters() if p.requires_grad} == expected
    assert report == parameter_report(model)
    assert report.trainable == sum(p.numel() for n, p in model.named_parameters() if n in expected)
    if case.methods:
        assert any(is_peft(n) for n in expected), "the method added parameters"
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    labels = torch.tensor([0, 1, 2])
    for step in range(3):
        opt.zero_grad()
        model(tokens(seed=step), labels=labels).loss.backward()
        opt.step()
    after = model.state_dict()
    changed = {k for k in after if not torch.equal(after[k], before[k])}
    assert changed <= expected, f"frozen tensors changed: {sorted(changed - expected)}"
    peft_names = {n for n in expected if is_peft(n)}
    assert peft_names <= changed, f"PEFT parameters did not train: {sorted(peft_names - changed)}"
    assert any(k.startswith("to_out.") for k in changed)


@pytest.mark.parametrize("case", PEFT_PARAMS)
def test_peft_only_save_and_load_is_exact(case, base, tmp_path):
    mlm = base_model(tl.PerformerForMaskedLM)
    mlm.save_pretrained(tmp_path / "base")
    model = from_base(case, base)
    model.load_checkpoint_state(mlm.state_dict(), report_missing=False)
    mark_trainable(model)
    perturb_peft(model)
    save_peft_weights(model, tmp_path / "peft")
    loaded = load_peft_model(tmp_path / "base", tmp_path / "peft", model_class=tl.PerformerForSequenceClassification)
    assert isinstance(loaded.config, tl.PerformerConfig) and loaded.config.prompt_type == case.config().prompt_type
    own, got = model.state_dict(), loaded.state_dict()
    assert own.keys() == got.keys()
    for key in own:
        assert torch.equal(own[key], got[key]), key
    ids = tokens()
    model.eval()
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)


def test_projection_name_map():
    lora = tl.PerformerModel(tl.PerformerConfig(**SIZES, prompt_type="lora"), warn_random_positions=False)
    attn = lora.performer.net.layers[0][0].fn
    assert isinstance(attn.to_q, LoRALinear) and isinstance(attn.to_v, LoRALinear)
    assert type(attn.to_k) is torch.nn.Linear and type(attn.to_out) is torch.nn.Linear
    assert attn.to_q.bias is None, "the bias-free projection stays bias-free under LoRA"
    assert "performer.net.layers.0.0.fn.to_q.bias" not in lora.state_dict()
    dora = tl.PerformerModel(tl.PerformerConfig(**SIZES, prompt_type="dora", lora_target_modules=["key"]),
                             warn_random_positions=False)
    assert isinstance(dora.performer.net.layers[1][0].fn.to_k, DoRALinear)
    assert dora.performer.net.layers[1][0].fn.to_k.bias is None
    ia3 = tl.PerformerModel(tl.PerformerConfig(**SIZES, prompt_type="ia3"), warn_random_positions=False)
    layer = ia3.performer.net.layers[0]
    # defaults: key, value (output-scaled); "output.dense" = to_out and w2 (input-scaled)
    scaled = {name: m.feedforward for name, m in layer.named_modules() if isinstance(m, IA3Linear)}
    assert scaled == {"0.fn.to_k": False, "0.fn.to_v": False, "0.fn.to_out": True, "1.fn.fn.w2": True}
    assert layer[0].fn.to_out.ia3_l.shape == (SIZES["heads"] * SIZES["dim_head"],)


def test_adapters_sit_at_the_hook_points():
    config = tl.PerformerConfig(**SIZES, prompt_type="Gene_token_prompt,encoder_prompt", adapter_ratio=0.5,
                                space_adapter_conf=[1, 0], mlp_adapter_conf=[0, 1], mlp_adapter_scale=0.25)
    model = tl.PerformerModel(config, warn_random_positions=False)
    assert model.adapter.D_fc1.weight.shape == (16, 32)
    layers = model.performer.net.layers
    assert layers[0].Space_Adapter is not None and layers[1].Space_Adapter is None
    assert layers[0].MLP_Adapter is None and layers[1].MLP_Adapter.scale == 0.25
    assert torch.count_nonzero(model.adapter.D_fc2.weight) == 0, "adapters start at zero"


@pytest.mark.parametrize("prompt_type", ["lora", "ia3", "dora"])
def test_merge_peft_matches(prompt_type, base):
    model = from_base(Case("m", dict(prompt_type=prompt_type)), base)
    perturb_peft(model)
    merged = merge_peft(model)
    assert merged.config.prompt_type == ""
    assert not any(is_peft(n) for n in merged.state_dict())
    ids = tokens()
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, model(ids).logits, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("overrides, fragment", [
    (dict(prompt_type="prefix_prompt"), "prefix_prompt"),
    (dict(freeze_preset="last"), "freeze_preset"),
    (dict(freeze_preset="scbert", freeze_layers=1), "freeze_layers"),
    (dict(freeze_preset="scbert", prompt_type="lora"), "prompt_type"),
    (dict(freeze_preset="scbert", depth=1), "depth >= 2"),
    (dict(freeze_layers=3), "freeze_layers"),
    (dict(prompt_type="lora", lora_r=0), "lora_r"),
    (dict(prompt_type="lora,dora"), "one module takes one method"),
    (dict(prompt_type="encoder_prompt", mlp_adapter_conf=[1]), "mlp_adapter_conf"),
])
def test_bad_peft_config(overrides, fragment):
    with pytest.raises(ValueError, match=fragment):
        tl.PerformerConfig(**{**SIZES, **overrides})


def test_peft_keys_round_trip(tmp_path):
    config = tl.PerformerConfig(**SIZES, prompt_type="lora, encoder_prompt", lora_r=2)
    config.save_pretrained(tmp_path)
    again = tl.PerformerConfig.from_pretrained(tmp_path)
    assert again == config and again.peft_methods == ("lora", "encoder_prompt")
    assert again.mlp_adapter_conf == [1, 1] and again.freeze_preset is None
    plain = tl.PerformerConfig(**SIZES)
    assert plain.peft_methods == () and plain.to_dict()["prompt_type"] == ""


def test_forward_takes_the_bert_call():
    """The job calls ``model(input_ids, attention_mask)``: all ones is accepted, padding refused."""
    model = base_model()
    ids = tokens()
    with torch.no_grad():
        assert torch.equal(model(ids, torch.ones_like(ids)).logits, model(ids).logits)
        mask = torch.ones_like(ids)
        mask[0, -1] = 0
        with pytest.raises(ValueError, match="padding"):
            model(ids, mask)
