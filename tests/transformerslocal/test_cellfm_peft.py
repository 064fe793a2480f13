"""The PEFT methods on CellFM through the registry (docs/cellfm.md "PEFT"): the generic case table
(start equals base; only intended parameters change after steps; PEFT-only save/load exact; merged
equals unmerged), the projection names (``attn.q_proj`` ... ``ffn.o_proj``), and what is refused.

Which parameters must train is written here from CellFM's names, independently of
``transformerslocal.peft.trainable``.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import pytest
import torch

import transformerslocal as tl
from transformerslocal.configuration_cellfm import LINEAR_PATHS
from transformerslocal.peft import load_peft_model, mark_trainable, merge_peft, parameter_report, save_peft_weights
from transformerslocal.peft.dora import DoRALinear
from transformerslocal.peft.ia3 import IA3Linear
from transformerslocal.peft.lora import LoRALinear

SIZES = dict(vocab_size=40, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=24,
             value_slots=16, max_genes=16, num_labels=3)
ALL_EIGHT = list(LINEAR_PATHS)

PREDICATES = {
    "lora": lambda n: n.endswith((".lora_A", ".lora_B")),
    "dora": lambda n: n.endswith((".dora_A", ".dora_B", ".dora_magnitude")),
    "ia3": lambda n: n.endswith(".ia3_l"),
    "Gene_token_prompt": lambda n: n.startswith("adapter."),
    "encoder_prompt": lambda n: ".Space_Adapter." in n or ".MLP_Adapter." in n,
}
SCALE_LIKE = (".ia3_l", ".dora_magnitude")
HEAD = "classifier."


def is_peft(name: str) -> bool:
    return any(p(name) for p in PREDICATES.values())


@dataclass(frozen=True)
class Case:
    id: str
    overrides: dict = field(default_factory=dict)
    methods: tuple[str, ...] = ()

    def config(self, **extra) -> tl.CellFMConfig:
        return tl.CellFMConfig(**{**SIZES, **self.overrides, **extra})

    def expected_trainable(self, name: str) -> bool:
        if not self.methods:
            if self.overrides.get("freeze_layers"):
                return not name.startswith(("gene_emb", "cls_token", "value_enc.", "encoder.0."))
            return True
        return name.startswith(HEAD) or any(PREDICATES[m](name) for m in self.methods)


CASES = [
    Case("full"),
    Case("full_freeze1", dict(freeze_layers=1)),
    Case("lora", dict(prompt_type="lora"), ("lora",)),
    Case("lora_all_eight", dict(prompt_type="lora", lora_target_modules=ALL_EIGHT, lora_r=4, lora_alpha=8),
         ("lora",)),
    Case("dora", dict(prompt_type="dora"), ("dora",)),
    Case("dora_ffn", dict(prompt_type="dora", lora_target_modules=["ffn.u_proj", "ffn.v_proj", "ffn.o_proj"]),
         ("dora",)),
    Case("ia3", dict(prompt_type="ia3"), ("ia3",)),
    Case("ia3_all_eight", dict(prompt_type="ia3", ia3_target_modules=ALL_EIGHT,
                               ia3_feedforward_modules=["ffn.o_proj", "attn.o_proj"]), ("ia3",)),
    Case("Gene_token_prompt", dict(prompt_type="Gene_token_prompt"), ("Gene_token_prompt",)),
    Case("encoder_prompt", dict(prompt_type="encoder_prompt"), ("encoder_prompt",)),
    Case("encoder_one_layer", dict(prompt_type="encoder_prompt", space_adapter_conf=[0, 1],
                                   mlp_adapter_conf=[1, 0]), ("encoder_prompt",)),
    Case("lora+gene_token+encoder", dict(prompt_type="lora,Gene_token_prompt,encoder_prompt"),
         ("lora", "Gene_token_prompt", "encoder_prompt")),
    Case("dora+ia3", dict(prompt_type="dora,ia3", lora_target_modules=["attn.q_proj", "attn.u_proj"],
                          ia3_target_modules=["attn.k_proj", "ffn.o_proj"]), ("dora", "ia3")),
    Case("switched_off", dict(prompt_type="lora,encoder_prompt", if_use_prompt=False)),
]
PARAMS = [pytest.param(c, id=c.id) for c in CASES]
PEFT_PARAMS = [pytest.param(c, id=c.id) for c in CASES if c.methods]


def base_model(cls=tl.CellFMForSequenceClassification):
    """A plain CellFM with random, perturbed weights: the "pretrained" model."""
    torch.manual_seed(0)
    model = cls(tl.CellFMConfig(**SIZES))
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.1)
    return model.eval()


def from_base(case: Case, base, **extra):
    torch.manual_seed(5)
    model = type(base)(case.config(**extra))
    model.load_checkpoint_state(base.state_dict(), report_missing=False)
    return model.eval()


@torch.no_grad()
def perturb_peft(model, seed: int = 7) -> None:
    gen = torch.Generator().manual_seed(seed)
    for name, param in model.named_parameters():
        if is_peft(name):
            noise = torch.randn(param.shape, generator=gen) * 0.1
            param.add_(noise) if name.endswith(SCALE_LIKE) else param.copy_(noise)


def cells(seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, SIZES["vocab_size"], (3, 9), generator=gen)
    values = torch.rand(3, 9, generator=gen) * 3
    mask = torch.ones(3, 9, dtype=torch.long)
    mask[1, 6:] = 0
    mask[2, 3:] = 0
    return ids * mask, values * mask, mask


def logits(model, seed: int = 0):
    with torch.no_grad():
        return model(*cells(seed)).logits


@pytest.fixture(scope="module")
def base():
    return base_model()


@pytest.mark.parametrize("case", PARAMS)
def test_start_equals_base(case, base):
    model = from_base(case, base)
    assert model.loading_info["missing_keys"] == sorted(
        n for n in model.state_dict() if is_peft(n) and case.methods), "only PEFT keys are new"
    torch.testing.assert_close(logits(model), logits(base), rtol=0, atol=1e-6)


@pytest.mark.parametrize("case", PARAMS)
def test_trainable_set_and_only_intended_parameters_change(case, base):
    model = from_base(case, base)
    report = mark_trainable(model)
    names = [n for n, _ in model.named_parameters()]
    expected = {n for n in names if case.expected_trainable(n)}
    assert {n for n, p in model.named_parameters() if p.requires_grad} == expected
    assert report == parameter_report(model)
    if case.methods:
        assert any(is_peft(n) for n in expected), "the method added parameters"
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    labels = torch.tensor([0, 1, 2])
    for step in range(3):
        opt.zero_grad()
        model(*cells(step), labels=labels).loss.backward()
        opt.step()
    after = model.state_dict()
    changed = {k for k in after if not torch.equal(after[k], before[k])}
    assert changed <= expected, f"frozen tensors changed: {sorted(changed - expected)}"
    peft_names = {n for n in expected if is_peft(n)}
    assert peft_names <= changed, f"PEFT parameters did not train: {sorted(peft_names - changed)}"
    assert any(k.startswith(HEAD) for k in changed)


@pytest.mark.parametrize("case", PEFT_PARAMS)
def test_peft_only_save_and_load_is_exact(case, base, tmp_path):
    pretrained = base_model(tl.CellFMForMaskedValues)
    pretrained.save_pretrained(tmp_path / "base")
    model = from_base(case, base)
    model.load_checkpoint_state(pretrained.state_dict(), report_missing=False)
    mark_trainable(model)
    perturb_peft(model)
    save_peft_weights(model, tmp_path / "peft")
    loaded = load_peft_model(tmp_path / "base", tmp_path / "peft", model_class=tl.CellFMForSequenceClassification)
    assert isinstance(loaded.config, tl.CellFMConfig) and loaded.config.prompt_type == case.config().prompt_type
    own, got = model.state_dict(), loaded.state_dict()
    assert own.keys() == got.keys()
    for key in own:
        assert torch.equal(own[key], got[key]), key
    model.eval()
    assert torch.equal(logits(loaded), logits(model))


@pytest.mark.parametrize("overrides", [
    dict(prompt_type="lora", lora_target_modules=ALL_EIGHT),
    dict(prompt_type="ia3", ia3_target_modules=ALL_EIGHT, ia3_feedforward_modules=["ffn.o_proj", "ffn.u_proj"]),
    dict(prompt_type="dora", lora_target_modules=ALL_EIGHT),
    dict(prompt_type="lora,ia3", ia3_target_modules=["attn.k_proj", "ffn.o_proj"]),
], ids=["lora", "ia3", "dora", "lora+ia3"])
def test_merged_equals_unmerged(overrides, base):
    model = from_base(Case("m", overrides), base)
    perturb_peft(model)
    merged = merge_peft(model)
    assert merged.config.prompt_type == ""
    assert not any(is_peft(n) for n in merged.state_dict())
    torch.testing.assert_close(logits(merged), logits(model), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(logits(model), logits(base), atol=1e-4), "the perturbed update changes the output"


def test_projection_names():
    lora = tl.CellFMModel(tl.CellFMConfig(**SIZES, prompt_type="lora"))
    layer = lora.encoder[0]
    replaced = {name for name, m in layer.named_modules() if isinstance(m, LoRALinear)}
    assert replaced == {"attn.q_proj", "attn.v_proj"}, "defaults: q and v"
    assert layer.attn.q_proj.bias is None and "encoder.0.attn.q_proj.bias" not in lora.state_dict()
    every = tl.CellFMModel(tl.CellFMConfig(**SIZES, prompt_type="dora", lora_target_modules=ALL_EIGHT))
    assert {n for n, m in every.encoder[1].named_modules() if isinstance(m, DoRALinear)} == set(LINEAR_PATHS)
    ia3 = tl.CellFMModel(tl.CellFMConfig(**SIZES, prompt_type="ia3"))
    scaled = {n: m.feedforward for n, m in ia3.encoder[0].named_modules() if isinstance(m, IA3Linear)}
    assert scaled == {"attn.k_proj": False, "attn.v_proj": False, "ffn.o_proj": True}
    assert ia3.encoder[0].ffn.o_proj.ia3_l.shape == (SIZES["intermediate_size"],)


def test_adapters_sit_at_the_hook_points():
    config = tl.CellFMConfig(**SIZES, prompt_type="Gene_token_prompt,encoder_prompt", adapter_ratio=0.5,
                             space_adapter_conf=[1, 0], mlp_adapter_conf=[0, 1])
    model = tl.CellFMModel(config)
    assert model.adapter.D_fc1.weight.shape == (16, 32)
    assert model.encoder[0].Space_Adapter is not None and model.encoder[1].Space_Adapter is None
    assert model.encoder[0].MLP_Adapter is None and model.encoder[1].MLP_Adapter is not None


@pytest.mark.parametrize("overrides, fragment", [
    (dict(prompt_type="prefix_prompt"), "has no hook for it"),
    (dict(prompt_type="lora", lora_target_modules=["query", "value"]), "attn.q_proj"),
    (dict(prompt_type="ia3", ia3_target_modules=["output.dense"]), "ffn.o_proj"),
    (dict(prompt_type="lora,dora"), "one module takes one method"),
    (dict(prompt_type="encoder_prompt", mlp_adapter_conf=[1]), "mlp_adapter_conf"),
    (dict(freeze_layers=3), "freeze_layers"),
])
def test_bad_peft_config(overrides, fragment):
    with pytest.raises(ValueError, match=fragment):
        tl.CellFMConfig(**{**SIZES, **overrides})


def test_peft_keys_round_trip(tmp_path):
    config = tl.CellFMConfig(**SIZES, prompt_type="lora, encoder_prompt", lora_r=2)
    config.save_pretrained(tmp_path)
    again = tl.CellFMConfig.from_pretrained(tmp_path)
    assert again == config and again.peft_methods == ("lora", "encoder_prompt")
    assert again.lora_target_modules == ["attn.q_proj", "attn.v_proj"] and again.mlp_adapter_conf == [1, 1]
