"""The torch thread count of a run: one thread per free core, --num_threads and OMP_NUM_THREADS win."""
from __future__ import annotations

import logging

import pytest

from geneformer_peft.training import threads


@pytest.fixture
def two_cores(monkeypatch):
    monkeypatch.setattr(threads, "available_cores", lambda: 2)

    def busy(value):
        monkeypatch.setattr(threads, "busy_cores", lambda **_: (value, "test"))

    return busy


@pytest.mark.parametrize("busy, expected", [(0.0, 2), (0.4, 2), (0.9, 1), (1.0, 1), (1.6, 1), (5.0, 1)])
def test_one_thread_per_free_core(busy, expected, two_cores):
    two_cores(busy)
    choice = threads.choose_num_threads(current=2, environ={})
    assert choice.num_threads == expected
    assert "2 cores available" in choice.reason and f"{min(busy, 2.0):.1f} busy" in choice.reason


def test_never_more_than_torch_default(two_cores):
    two_cores(0.0)
    assert threads.choose_num_threads(current=1, environ={}).num_threads == 1


def test_flag_and_environment_win(two_cores):
    two_cores(2.0)
    assert threads.choose_num_threads(3, current=2, environ={}) == threads.ThreadChoice(3, "--num_threads")
    choice = threads.choose_num_threads(current=2, environ={"OMP_NUM_THREADS": "2"})
    assert choice.num_threads == 2 and "OMP_NUM_THREADS=2" in choice.reason
    with pytest.raises(ValueError, match="--num_threads 0"):
        threads.choose_num_threads(0)


def test_busy_cores_from_proc_stat(tmp_path, monkeypatch):
    """Per-CPU lines of the CPUs we may use: cpu0 fully busy, cpu1 a quarter, cpu2 (not ours) idle."""
    stat = tmp_path / "stat"
    before = ("cpu  300 0 300 2400 0 0 0 0 0 0\ncpu0 100 0 100 800 0 0 0 0 0 0\n"
              "cpu1 100 0 100 800 0 0 0 0 0 0\ncpu2 100 0 100 800 0 0 0 0 0 0\nintr 1 2\n")
    after = ("cpu  425 0 425 2850 0 0 0 0 0 0\ncpu0 150 0 150 800 0 0 0 0 0 0\n"
             "cpu1 125 0 125 950 0 0 0 0 0 0\ncpu2 100 0 100 1000 0 0 0 0 0 0\nintr 1 2\n")
    texts = iter([before, after])
    monkeypatch.setattr(threads.Path, "read_text", lambda self: next(texts))
    busy, how = threads.busy_cores(seconds=0.0, stat=stat, cpus={0, 1})
    assert busy == pytest.approx(1.0 + 0.25) and "/proc/stat" in how
    texts = iter([before.split("\n")[0], after.split("\n")[0]])  # no per-CPU lines: the all-CPU share
    busy, _ = threads.busy_cores(seconds=0.0, stat=stat, cpus={0, 1})
    assert busy == pytest.approx(2 * 250 / 700)


def test_choice_is_logged(monkeypatch, caplog):
    import torch

    before = torch.get_num_threads()
    with caplog.at_level(logging.INFO):
        choice = threads.apply_num_threads(1)
    assert torch.get_num_threads() == 1 and "torch threads: 1 (--num_threads)" in caplog.text
    torch.set_num_threads(before)
    assert choice.num_threads == 1
