"""docs/tutorial.ipynb runs top to bottom (with few epochs and one fold, set in its parameters
cell), and the stored copy carries the outputs of a full run."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

import job_factories as jf

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / "docs" / "tutorial.ipynb"
#: the test's settings, put into the cell tagged "parameters"
FAST = {"EPOCHS": 1, "FOLDS": [0], "PERTURB_CELLS": 2}


def _kernel_or_skip() -> None:
    nbclient = pytest.importorskip("nbclient", reason="the test extra's nbclient is not installed")
    del nbclient
    pytest.importorskip("ipykernel", reason="the test extra's ipykernel is not installed")
    from jupyter_client.kernelspec import KernelSpecManager, NoSuchKernel

    try:
        KernelSpecManager().get_kernel_spec("python3")
    except NoSuchKernel:
        pytest.skip("no python3 Jupyter kernel")


def test_the_stored_notebook_shows_every_step_with_outputs():
    nb = json.loads(NOTEBOOK.read_text(encoding="utf-8"))
    code = [c for c in nb["cells"] if c["cell_type"] == "code"]
    assert all(c.get("outputs") for c in code[2:])  # after the parameters and setup cells
    assert not [o for c in code for o in c["outputs"] if o["output_type"] == "error"]
    sources = "\n".join("".join(c["source"]) for c in code)
    for step in ("gp.tokenize(", "gp.split(", "gp.finetune(", "gp.predict(", "gp.embed(", "gp.umap(", "gp.perturb("):
        assert step in sources, step
    images = sum("image/png" in o.get("data", {}) for c in code for o in c["outputs"])
    assert images >= 4  # summary, training curves, confusion matrix, UMAP


def test_the_notebook_runs(tmp_path):
    _kernel_or_skip()
    import nbformat
    from nbclient import NotebookClient

    nb = nbformat.read(NOTEBOOK, as_version=4)
    params = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
    assert len(params) == 1
    params[0].source = "\n".join(f"{k} = {v!r}" for k, v in {**FAST, "OUT": str(tmp_path / "out")}.items())
    client = NotebookClient(nb, kernel_name="python3", timeout=600,
                            resources={"metadata": {"path": str(ROOT / "docs")}})
    client.execute(env=jf._subprocess_env())
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "error"]
    assert not errors
    assert (tmp_path / "out" / "runs" / "Gene_token_prompt" / "synthetic" / "0" / "fold_done.json").is_file()
    shown = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.outputs)
    assert "accuracy on new cells" in shown and "kNN accuracy" in shown and "genes tested" in shown
    assert "fold 0 epoch 1:" in shown  # one log line per epoch in a notebook
    assert "Saving the dataset" not in shown
