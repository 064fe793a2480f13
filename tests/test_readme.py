"""The README as a reader uses it: short, its test command the one CI runs, its Python API block
runs as written from the repository root, and what it says about installs and defaults is true."""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import job_factories as jf

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text(encoding="utf-8")


def _section(text: str, heading: str) -> str:
    match = re.search(rf"^## {re.escape(heading)}\n(.*?)(?=^## |\Z)", text, flags=re.S | re.M)
    assert match, f"README has no '## {heading}' section"
    return match.group(1)


def test_the_readme_is_short_and_keeps_ci_test_command():
    assert len(README.splitlines()) < 250
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    assert "python3 -m pytest -q tests" in _section(README, "Run the tests")
    assert "python3 -m pytest -q tests" in ci
    for target in re.findall(r"\]\((docs/[^)#]+)", README):  # every linked doc exists (own_data.md: the lead's)
        assert (ROOT / target).exists() or target == "docs/own_data.md", target


def test_the_python_api_block_runs_as_written(tmp_path):
    """From a fresh process whose working directory looks like the repository root (the data and
    checkpoint linked, so the run writes its save/ folder under tmp_path, not into the checkout)."""
    blocks = re.findall(r"```python\n(.*?)```", _section(README, "Python API"), flags=re.S)
    assert len(blocks) == 1
    for name in ("example_py", "Pretrain_ckpts"):
        (tmp_path / name).symlink_to(ROOT / name)
    out = subprocess.run([sys.executable, "-c", blocks[0]], cwd=tmp_path, capture_output=True, text=True,
                         timeout=600, env=jf._subprocess_env())
    assert out.returncode == 0, out.stderr[-3000:]
    assert "macro_f1" in out.stdout and "logistic regression" in out.stdout and "fdr" in out.stdout
    assert (tmp_path / "save" / "api" / "lora" / "synthetic" / "0" / "fold_done.json").is_file()


def test_extras_the_readme_names_are_the_ones_setup_declares():
    setup = (ROOT / "setup.py").read_text(encoding="utf-8")
    core = re.search(r"install_requires=\[(.*?)\]", setup, flags=re.S).group(1)
    extras = dict(re.findall(r'"(\w+)": \[([^\]]*)\]', re.search(r"extras_require=\{(.*?)\n    \}", setup,
                                                                  flags=re.S).group(1)))
    install = _section(README, "Install")
    named = dict(re.findall(r"`\.\[(\w+)\]` \(([^)]*)", install))
    assert set(named) <= set(extras), named
    for extra, what in named.items():
        if extra == "test":
            continue
        package = re.split(r"[:,]", what)[0].strip().lower()
        assert package in extras[extra].lower(), (extra, package)
    assert "optuna" not in core.lower() and "optuna" in extras["search"].lower()
    for package in ("nbclient", "ipykernel", "umap-learn", "matplotlib", "optuna"):  # the tests run all of it
        assert package in extras["test"], package


def test_the_example_script_changes_the_defaults_its_docs_count():
    """docs/usage.md says how many of finetune's defaults the example script changes, and names each."""
    import importlib.util

    from geneformer_peft.api.training import finetune_defaults

    spec = importlib.util.spec_from_file_location("example_script", jf.SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    command = finetune_defaults()
    changed = sorted(k for k, v in module.EXAMPLE_DEFAULTS.items() if command[k] != v)
    usage = (ROOT / "docs" / "usage.md").read_text(encoding="utf-8")
    words = {5: "five", 6: "six", 7: "seven", 8: "eight"}
    sentence = re.search(r"with (\w+) defaults changed(.*?)Each `--help`", usage, flags=re.S)
    assert sentence and sentence.group(1) == words[len(changed)], (sentence and sentence.group(1), changed)
    flags = {"epochs": "--epoch"}
    for name in changed:
        assert flags.get(name, f"--{name}") in sentence.group(2), name
