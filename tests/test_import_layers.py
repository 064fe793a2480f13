"""The house rules of imports, read from the source (every import statement, also those
inside functions): transformerslocal never imports the application, and inside
geneformer_peft a stage imports only stages below it, so there is no circle."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

#: stage of each top-level part of geneformer_peft, lowest first
STAGES = {"_lazy": 0, "errors": 0, "log_format": 0, "files": 0, "fingerprints": 0, "data": 1, "models": 2, "checks": 3,
          "evaluation": 3, "training": 4, "analysis": 5, "commands": 6, "cli": 6, "api": 6, "compat": 7}


def _imports(path: Path) -> list[tuple[int, str]]:
    """(line, dotted module) of every absolute import in ``path`` (relative ones resolved)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    package = ".".join(path.relative_to(ROOT).with_suffix("").parts[:-1])
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            found.append((node.lineno, module))
            found += [(node.lineno, f"{module}.{alias.name}") for alias in node.names]
    return found


def _stage(module: str) -> int | None:
    parts = module.split(".")
    if parts[0] != "geneformer_peft" or len(parts) < 2:
        return None
    return STAGES.get(parts[1])


def _sources(package: str) -> list[Path]:
    return sorted((ROOT / package).rglob("*.py"))


def test_every_part_of_the_application_has_a_stage():
    parts = {p.name if p.is_dir() else p.stem for p in (ROOT / "geneformer_peft").iterdir()
             if (p.is_dir() and (p / "__init__.py").exists()) or (p.suffix == ".py" and p.stem != "__init__")}
    assert parts <= set(STAGES), f"give {sorted(parts - set(STAGES))} a stage in STAGES"


def test_transformerslocal_never_imports_the_application():
    offenders = [f"{path.relative_to(ROOT)}:{line} imports {module}"
                 for path in _sources("transformerslocal") for line, module in _imports(path)
                 if module.split(".")[0] == "geneformer_peft"]
    assert not offenders, offenders


@pytest.mark.parametrize("path", _sources("geneformer_peft"), ids=lambda p: str(p.relative_to(ROOT)))
def test_imports_run_from_higher_stages_to_lower_ones(path):
    own = _stage(".".join(path.relative_to(ROOT).with_suffix("").parts))
    if own is None:
        return  # the package's face
    upward = [f"line {line}: {module}" for line, module in _imports(path)
              if (stage := _stage(module)) is not None and stage > own]
    assert not upward, f"{path.relative_to(ROOT)} (stage {own}) imports a higher stage: {upward}"


def test_only_commands_and_cli_parse_arguments_or_configure_logging():
    offenders = []
    for path in _sources("geneformer_peft"):
        stage = _stage(".".join(path.relative_to(ROOT).with_suffix("").parts))
        if stage is None or stage == STAGES["cli"]:
            continue
        text = path.read_text(encoding="utf-8")
        for needle in ("import argparse", "logging.basicConfig", "sys.exit("):
            if needle in text:
                offenders.append(f"{path.relative_to(ROOT)}: {needle}")
    assert not offenders, offenders
