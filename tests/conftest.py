"""Session fixtures of the fine-tuning job tests (tests/test_job_*.py); see job_factories.py."""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

import job_factories as jf  # noqa: E402


@pytest.fixture(scope="session", autouse=True)
def _single_cpu_thread():
    """One intra-op thread: on a small, shared CPU, torch's default thread pool spins
    against other processes and makes a tiny model ~100x slower."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def job_data(tmp_path_factory) -> jf.JobData:
    """A tiny synthetic dataset in the reference fold layout (2 folds, 3 cell types) and a
    tiny random checkpoint over its vocabulary."""
    import datasets

    datasets.disable_progress_bars()
    return jf.make_job_data(tmp_path_factory.mktemp("job_data"))


@pytest.fixture(scope="session")
def example_script():
    """The example script's module, to call its ``main(argv)`` in this process."""
    spec = importlib.util.spec_from_file_location("cell_classification_prompt_fold", jf.SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def finished_runs(job_data, tmp_path_factory):
    """prompt_type -> run folder of a finished 2-fold run (computed once, on first use).

    Full fine-tuning and the combination run as a user runs them (the example script in a
    subprocess); single methods run in this process through ``geneformer-peft finetune``.
    """
    output = tmp_path_factory.mktemp("runs")
    cache: dict[str, Path] = {}

    def get(prompt_type: str) -> Path:
        if prompt_type not in cache:
            argv = job_data.finetune_argv(output, "--prompt_type", prompt_type)
            if prompt_type in ("", "Gene_token_prompt,lora"):
                proc = jf.run_script(argv)
                assert proc.returncode == 0, proc.stderr[-4000:]
            else:
                assert jf.run_finetune(argv) == 0
            cache[prompt_type] = jf.run_dir(output, prompt_type, job_data)
        return cache[prompt_type]

    return get
