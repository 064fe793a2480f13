"""The PEFT registry (docs/peft_keys.md §8): one module per method with one ``METHOD``, the
config defaults and ``PEFT_METHODS`` assembled from it, and no import circle in
``transformerslocal`` (``peft/`` never imports the config or the models back)."""
from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest
from torch import nn

import transformerslocal
from transformerslocal import PEFT_METHODS
from transformerslocal.configuration_bert import PEFT_DEFAULTS
from transformerslocal.peft import METHOD_KEYS, REGISTRY, PeftMethod
from transformerslocal.peft.base import LINEAR_PATHS, MODULE_POINTS

PACKAGE = Path(transformerslocal.__file__).resolve().parent
SHARED_KEYS = ("prompt_type", "if_use_prompt", "freeze_layers", "classifier_pooling")
METHOD_MODULES = {"lora": "lora", "prefix_prompt": "prefix", "Gene_token_prompt": "gene_token",
                  "encoder_prompt": "encoder_adapter", "ia3": "ia3", "dora": "dora"}


def test_registry_lists_every_method_once_in_order():
    assert PEFT_METHODS == tuple(REGISTRY) == tuple(METHOD_MODULES)
    assert METHOD_KEYS == {name: m.trainable_fragments for name, m in REGISTRY.items()}


@pytest.mark.parametrize("name, module", METHOD_MODULES.items())
def test_one_method_per_module(name, module):
    mod = importlib.import_module(f"transformerslocal.peft.{module}")
    assert mod.METHOD is REGISTRY[name]
    assert sum(isinstance(v, PeftMethod) for v in vars(mod).values()) == 1


def test_peft_defaults_are_the_shared_keys_plus_the_methods_keys():
    method_keys = {k: v for m in REGISTRY.values() for k, v in m.config_keys.items()}
    assert set(PEFT_DEFAULTS) == set(SHARED_KEYS) | set(method_keys)
    for key, default in method_keys.items():
        assert PEFT_DEFAULTS[key] == default, key
    # shared between methods with one default
    assert "adapter_ratio" in REGISTRY["Gene_token_prompt"].config_keys
    assert "adapter_ratio" in REGISTRY["encoder_prompt"].config_keys
    assert set(REGISTRY["dora"].config_keys) == set(REGISTRY["lora"].config_keys) - {"lora_merge_weights"}


def test_trainable_fragments_are_disjoint():
    fragments = [f for m in REGISTRY.values() for f in m.trainable_fragments]
    assert len(fragments) == len(set(fragments))
    for a in fragments:
        for b in fragments:
            assert a == b or a not in b, (a, b)


def test_hook_points_of_the_methods():
    uses = {name: (sorted(m.modules), m.build_linear is not None) for name, m in REGISTRY.items()}
    assert uses == {
        "lora": ([], True),
        "prefix_prompt": (["layer_prompt"], False),
        "Gene_token_prompt": (["embedding_output"], False),
        "encoder_prompt": (["attention_output", "ffn_output"], False),
        "ia3": ([], True),
        "dora": ([], True),
    }
    assert set(MODULE_POINTS) == {"embedding_output", "attention_output", "ffn_output", "layer_prompt"}
    assert len(LINEAR_PATHS) == 6


@pytest.mark.parametrize("kwargs, match", [
    (dict(name="a,b"), "without commas"),
    (dict(trainable_fragments=()), "own parameters"),
    (dict(linear_targets=lambda c: frozenset()), "together"),
    (dict(modules={"pooler_output": lambda c, i: nn.Identity()}), "unknown hook points"),
])
def test_peft_method_checks_its_shape(kwargs, match):
    with pytest.raises(ValueError, match=match):
        PeftMethod(**{"name": "toy", "config_keys": {}, "trainable_fragments": (".toy.",), **kwargs})


def test_method_keys_are_read_only():
    with pytest.raises(TypeError):
        REGISTRY["lora"].config_keys["lora_r"] = 4
    with pytest.raises(AttributeError):
        REGISTRY["lora"].name = "other"


# ----------------------------------------------------------------------------- imports
def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _internal_imports(path: Path) -> set[str]:
    """transformerslocal modules ``path`` imports, anywhere in the file (functions included)."""
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            targets = [target] + [f"{target}.{a.name}" for a in node.names]
        elif isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        else:
            continue
        for t in targets:
            file = PACKAGE.parent / t.replace(".", "/")
            if t.startswith("transformerslocal") and (file.with_suffix(".py").is_file()
                                                      or (file / "__init__.py").is_file()):
                out.add(t)
                parts = t.split(".")  # importing a.b.c runs the packages a.b and a first
                out.update(".".join(parts[:i]) for i in range(1, len(parts)))
    # a package being imported already is not imported again by its submodules (``from . import x``)
    ancestors = {".".join(name.split(".")[:i]) for i in range(1, name.count(".") + 1)}
    return out - {name} - ancestors


def _graph() -> dict[str, set[str]]:
    return {_module_name(p): _internal_imports(p) for p in PACKAGE.rglob("*.py")}


def test_no_import_cycles_in_transformerslocal():
    graph = _graph()
    assert "transformerslocal.peft.registry" in graph
    state: dict[str, int] = {}

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        for nxt in graph.get(node, ()):
            if state.get(nxt) == 1:
                raise AssertionError("import cycle: " + " -> ".join(stack[stack.index(nxt):] + [nxt]))
            if nxt not in state:
                visit(nxt, stack + [nxt])
        state[node] = 2

    for node in graph:
        if node not in state:
            visit(node, [node])


def test_peft_does_not_import_the_config_or_the_models():
    allowed_outside = {"transformerslocal.dropout"}  # a leaf: torch only
    for module, imports in _graph().items():
        if module.startswith("transformerslocal.peft"):
            outside = {i for i in imports if not i.startswith("transformerslocal.peft")} - allowed_outside
            assert not outside, f"{module} imports {outside}"
