"""One run per output folder: a second job exits 2 at once naming the holder; a stale lock
(its process gone) is taken over with a warning."""
from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time

import job_factories as jf
import pytest

from geneformer_peft.training import run_lock


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def _write_lock(run, pid, host=None):
    run.mkdir(parents=True, exist_ok=True)
    (run / run_lock.LOCK_NAME).write_text(json.dumps({"pid": pid, "host": host or socket.gethostname(),
                                                      "started_at": "2026-01-01T00:00:00+00:00"}))


def test_concurrent_jobs_second_exits_2_naming_the_first(job_data, tmp_path, caplog):
    argv = job_data.finetune_argv(tmp_path, "--prompt_type", "lora", "--folds", "0", "--epoch", "40",
                                  "--early_stopping_patience", "0")
    run = jf.run_dir(tmp_path, "lora", job_data)
    lock = run / run_lock.LOCK_NAME
    first = subprocess.Popen([sys.executable, str(jf.SCRIPT), *argv], env=jf._subprocess_env(),
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 240
        while not (lock.is_file() and lock.read_text().strip()) and first.poll() is None:
            assert time.monotonic() < deadline, "the first job never took the lock"
            time.sleep(0.2)
        assert first.poll() is None, "the first job ended before the second started"
        t0 = time.monotonic()
        caplog.clear()
        with caplog.at_level(logging.ERROR):
            assert jf.run_finetune(argv) == 2
        assert time.monotonic() - t0 < 60, "refused at once, not after training"
        message = caplog.records[-1].getMessage()
        assert f"process {first.pid} on host {socket.gethostname()}" in message and str(lock) in message
        assert "--output_path" in message
        assert first.poll() is None, "the first job keeps running"
        assert json.loads(lock.read_text())["pid"] == first.pid, "the second job left the lock alone"
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    # SIGKILL left the lock behind: stale now, taken over with a warning
    assert json.loads(lock.read_text())["pid"] == first.pid
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        taken = run_lock.acquire_run_lock(run)
    assert f"process {first.pid}" in caplog.text and "stale lock" in caplog.text
    assert json.loads(taken.read_text())["pid"] == os.getpid()
    run_lock.release_run_lock(taken)
    assert not taken.exists()


def test_lock_of_a_live_process_refuses_without_touching_the_run(job_data, tmp_path, caplog):
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        run = jf.run_dir(tmp_path, "lora", job_data)
        _write_lock(run, holder.pid)
        with caplog.at_level(logging.ERROR):
            assert jf.run_finetune(job_data.finetune_argv(tmp_path, "--prompt_type", "lora")) == 2
        assert str(holder.pid) in caplog.records[-1].getMessage()
        assert sorted(p.name for p in run.iterdir()) == [run_lock.LOCK_NAME], "no run.log, no fold folder"
    finally:
        holder.kill()
        holder.wait()


def test_stale_lock_is_taken_over_and_the_run_completes(job_data, tmp_path, caplog):
    run = jf.run_dir(tmp_path, "lora", job_data)
    dead = _dead_pid()
    _write_lock(run, dead)
    with caplog.at_level(logging.WARNING):
        assert jf.run_finetune(job_data.finetune_argv(tmp_path, "--prompt_type", "lora", "--folds", "0",
                                                      "--epoch", "1")) == 0
    assert "taking over the stale lock" in caplog.text and f"process {dead}" in caplog.text
    assert (run / "0" / "fold_done.json").is_file()
    assert not (run / run_lock.LOCK_NAME).exists(), "released at the end"


def test_lock_from_another_host_is_never_taken_over(tmp_path):
    _write_lock(tmp_path, _dead_pid(), host="some-other-host")
    with pytest.raises(run_lock.RunLocked, match="some-other-host"):
        run_lock.acquire_run_lock(tmp_path)


def test_empty_lock_is_stale_only_after_a_grace_period(tmp_path):
    lock = tmp_path / run_lock.LOCK_NAME
    lock.write_text("")
    with pytest.raises(run_lock.RunLocked, match="just starting"):
        run_lock.acquire_run_lock(tmp_path)
    old = time.time() - 2 * run_lock.EMPTY_LOCK_GRACE_SECONDS
    os.utime(lock, (old, old))
    taken = run_lock.acquire_run_lock(tmp_path)
    assert json.loads(taken.read_text())["pid"] == os.getpid()


def test_only_one_of_many_racing_takers_wins(tmp_path):
    """Atomic create: of processes started at once on a fresh folder, exactly one holds the lock."""
    go, stop = tmp_path / "go", tmp_path / "stop"
    code = (f"import os, sys, time; sys.path.insert(0, {str(jf.ROOT)!r})\n"
            "from geneformer_peft.training import run_lock\n"
            f"while not os.path.exists({str(go)!r}): time.sleep(0.01)\n"
            f"try:\n    run_lock.acquire_run_lock({str(tmp_path / 'run')!r}); print('won', flush=True)\n"
            f"    while not os.path.exists({str(stop)!r}): time.sleep(0.01)\n"
            "except run_lock.RunLocked:\n    print('lost', flush=True)\n")
    procs = [subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True) for _ in range(4)]
    try:
        time.sleep(2)  # let them import and wait for the start signal
        go.touch()
        results = [p.stdout.readline().strip() for p in procs]  # the winner holds the lock meanwhile
    finally:
        stop.touch()
        for p in procs:
            p.communicate(timeout=120)
    assert sorted(results) == ["lost", "lost", "lost", "won"]
