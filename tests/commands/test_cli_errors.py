"""Faults at the command line: a write that fails (full disk, ``ulimit -f``, read-only file
system, refused permission) and SIGTERM each end in one line and their exit code, with no
traceback. Real faults run a command in a subprocess (``resource.setrlimit`` for ``ulimit -f``;
a private tmpfs mount through ``unshare`` for a full disk and a read-only file system, skipped
where the machine does not allow it)."""
from __future__ import annotations

import argparse
import errno
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import job_factories as jf
import pytest
import torch

from geneformer_peft import cli
from geneformer_peft.errors import RunTerminated, Terminated, os_error_message

SPLIT = "geneformer_peft.commands.split"


def _errors(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]


def _run_split_raising(error: BaseException, monkeypatch, caplog, tmp_path) -> tuple[int, list[str]]:
    import geneformer_peft.commands.split as split_command

    def fail(args):
        raise error

    monkeypatch.setattr(split_command, "run", fail)
    caplog.clear()
    with caplog.at_level(logging.ERROR):
        status = cli.main(["split", "--input", "a", "--dataset_name", "x", "--output_dir", str(tmp_path / "out")])
    return status, _errors(caplog)


# ----------------------------------------------------------------------------- write errors


@pytest.mark.parametrize("code, expected", [
    (errno.ENOSPC, "no space left on device while writing {path}"),
    (errno.EFBIG, "file too large (ulimit -f?) while writing {path}"),
    (errno.EROFS, "read-only file system: {path}"),
    (errno.EACCES, "permission denied: {path}"),
    (errno.EDQUOT, "disk quota exceeded while writing {path}"),
])
def test_a_failed_write_is_one_line_naming_the_path_exit_2(code, expected, monkeypatch, caplog, tmp_path):
    path = tmp_path / "out" / "x" / "0" / "x_train0.dataset"
    status, errors = _run_split_raising(OSError(code, os.strerror(code), str(path)), monkeypatch, caplog, tmp_path)
    assert status == 2
    assert errors == [expected.format(path=path)]


def test_a_failed_write_naming_no_file_names_the_output(monkeypatch, caplog, tmp_path):
    status, errors = _run_split_raising(OSError(errno.ENOSPC, "No space left on device"), monkeypatch, caplog, tmp_path)
    assert status == 2
    assert errors == [f"no space left on device while writing {tmp_path / 'out'}"]


@pytest.mark.parametrize("error, reason", [
    (RuntimeError("Set slist enabled failed (file write failed: time = Mon Dec  7 09:17:09 2026\n, filename = "
                  "'/data/emb.h5ad', file descriptor = 3, errno = 28, error message = 'No space left on device')"),
     "no space left on device while writing /data/emb.h5ad"),
    (Exception("Error while serializing: I/O error: File too large (os error 27)"), "file too large (ulimit -f?)"),
    (OSError(27, "Error writing bytes to file. Detail: [errno 27] File too large"), "file too large (ulimit -f?)"),
])
def test_libraries_write_errors_are_recognised(error, reason, monkeypatch, caplog, tmp_path):
    """HDF5 (h5ad), safetensors and pyarrow report the errno in their own words."""
    status, errors = _run_split_raising(error, monkeypatch, caplog, tmp_path)
    assert status == 2 and len(errors) == 1 and errors[0].startswith(reason)


def test_a_project_error_keeps_its_own_message(monkeypatch, caplog, tmp_path):
    status, errors = _run_split_raising(FileNotFoundError(f"--input {tmp_path / 'a'} does not exist"), monkeypatch,
                                        caplog, tmp_path)
    assert status == 2 and errors == [f"--input {tmp_path / 'a'} does not exist"]
    assert os_error_message(ValueError("no errno here")) is None


def _fsize_limited(limit: int):
    import resource

    def apply() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.RLIM_INFINITY))

    return apply


def _cli(argv: list[str], **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "geneformer_peft.cli", *argv], cwd=jf.ROOT, env=jf._subprocess_env(),
                          capture_output=True, text=True, timeout=300, **kwargs)


def _last_line(stderr: str) -> str:
    return stderr.strip().splitlines()[-1]


def test_ulimit_f_in_split_is_one_line_exit_2(job_data, tmp_path):
    out = tmp_path / "folds"
    proc = _cli(["split", "--input", str(job_data.cells), "--dataset_name", "x", "--output_dir", str(out),
                 "--n_folds", "2"], preexec_fn=_fsize_limited(2048))
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    assert "file too large (ulimit -f?) while writing " in _last_line(proc.stderr)
    assert str(out) in _last_line(proc.stderr)


def test_ulimit_f_in_a_torch_save_is_one_line_exit_2(job_data, tmp_path):
    """remap-vocab of a pytorch_model.bin checkpoint writes one with torch.save (through
    save_torch): torch alone says "unexpected pos ..."."""
    from transformerslocal import BertForMaskedLM

    ckpt = tmp_path / "bin_ckpt"
    BertForMaskedLM.from_pretrained(job_data.model_path).save_pretrained(ckpt, safe_serialization=False)
    from geneformer_peft.files import write_pickle

    vocab = write_pickle(tmp_path / "token_dictionary.pkl", job_data.token_dictionary)
    out = tmp_path / "remapped"
    proc = _cli(["remap-vocab", "--model_path", str(ckpt), "--token_dictionary", str(vocab),
                 "--old_token_dictionary", str(vocab), "--output_dir", str(out)],
                preexec_fn=_fsize_limited(8192))
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr and "unexpected pos" not in proc.stderr
    last = _last_line(proc.stderr)
    assert "file too large (ulimit -f?) while writing " in last and "pytorch_model.bin" in last, last


def test_save_torch_names_the_file_and_reason(tmp_path):
    """torch.save's RuntimeError becomes the OSError of the write; nothing half-written stays."""
    code = ("import resource, sys, torch; from pathlib import Path\n"
            "from geneformer_peft.files import write_torch\n"
            "resource.setrlimit(resource.RLIMIT_FSIZE, (4096, resource.RLIM_INFINITY))\n"
            "try:\n    write_torch(Path(sys.argv[1]), {'w': torch.zeros(10000)})\n"
            "except OSError as e:\n    print(e.errno, e.filename)\n")
    target = tmp_path / "sub" / "state.pt"
    proc = subprocess.run([sys.executable, "-c", code, str(target)], env=jf._subprocess_env(), cwd=jf.ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.stdout.split() == [str(errno.EFBIG), str(target)], proc.stderr[-2000:]
    assert list((tmp_path / "sub").iterdir()) == []


def test_save_torch_without_an_os_error_measures_the_disk(tmp_path, monkeypatch):
    """A torch write failure that carries no OSError: a full disk is found by statvfs."""
    import transformerslocal.modeling_utils as mu
    from geneformer_peft.files import write_torch

    def failing_save(obj, f):
        f.write(b"x" * 10)
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 7552 vs 7446")

    class Full:
        f_bavail, f_frsize = 0, 4096

    monkeypatch.setattr(mu.torch, "save", failing_save)
    monkeypatch.setattr(mu.os, "statvfs", lambda path: Full())
    with pytest.raises(OSError) as caught:
        write_torch(tmp_path / "state.pt", {"w": torch.zeros(3)})
    assert caught.value.errno == errno.ENOSPC and caught.value.filename == str(tmp_path / "state.pt")
    assert list(tmp_path.iterdir()) == []


def test_save_torch_writes_a_loadable_file(tmp_path):
    from geneformer_peft.files import write_torch

    state = {"w": torch.arange(6.0).reshape(2, 3), "b": torch.ones(2)}
    path = write_torch(tmp_path / "a" / "state.pt", state)
    loaded = torch.load(path, weights_only=True)
    assert set(loaded) == {"w", "b"} and torch.equal(loaded["w"], state["w"])
    assert [p.name for p in path.parent.iterdir()] == ["state.pt"]


def _unshare_works() -> bool:
    import job_factories

    return job_factories.private_tmpfs_works()


needs_mount_namespace = pytest.mark.skipif(not _unshare_works(),
                                           reason="no private mount namespace (unshare -rm) to mount a tmpfs in")


@needs_mount_namespace
@pytest.mark.parametrize("options, reason", [("size=64k", "no space left on device while writing "),
                                             ("size=1m,ro", "read-only file system: ")])
def test_full_disk_and_read_only_file_system(options, reason, job_data, tmp_path):
    """``split`` onto a private tmpfs: 64 KiB (full after the first shard) or mounted read-only."""
    mount = tmp_path / "mnt"
    mount.mkdir()
    out = mount / "folds"
    command = " ".join(map(str, [sys.executable, "-m", "geneformer_peft.cli", "split", "--input", job_data.cells,
                                 "--dataset_name", "x", "--output_dir", out, "--n_folds", "2"]))
    proc = subprocess.run(["unshare", "-rm", "sh", "-c", f"mount -t tmpfs -o {options} tmpfs {mount} && exec {command}"],
                          cwd=jf.ROOT, env=jf._subprocess_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    last = _last_line(proc.stderr)
    assert reason in last and str(mount) in last, last


@pytest.mark.skipif(os.geteuid() == 0, reason="as root chmod does not refuse a write; the mapping of EACCES is "
                                              "tested with a constructed error above")
def test_permission_denied_output_folder(job_data, tmp_path):
    parent = tmp_path / "locked"
    parent.mkdir()
    parent.chmod(0o555)
    try:
        proc = _cli(["split", "--input", str(job_data.cells), "--dataset_name", "x", "--output_dir",
                     str(parent / "folds"), "--n_folds", "2"])
    finally:
        parent.chmod(0o755)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "permission denied: " in _last_line(proc.stderr)


# ----------------------------------------------------------------------------- SIGTERM


def test_sigterm_is_one_line_exit_143_and_the_handler_is_restored(monkeypatch, caplog, tmp_path):
    import geneformer_peft.commands.split as split_command

    def terminated(args):
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(10)  # the handler raises at once
        raise AssertionError("SIGTERM did not stop the command")

    before = signal.getsignal(signal.SIGTERM)
    if before is not signal.SIG_DFL:
        pytest.skip("the test runner has its own SIGTERM handler, which the command line leaves alone")
    monkeypatch.setattr(split_command, "run", terminated)
    with caplog.at_level(logging.ERROR):
        status = cli.main(["split", "--input", "a", "--dataset_name", "x", "--output_dir", str(tmp_path)])
    assert status == 143
    assert _errors(caplog) == ["terminated (SIGTERM); nothing was written (this command writes its output whole or "
                               "not at all); rerun the same command to start again"]
    assert signal.getsignal(signal.SIGTERM) == before


@pytest.mark.parametrize("command, resumes", [(name, name in cli.RESUMABLE) for name in cli.COMMANDS])
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_the_interruption_line_says_resume_only_for_commands_that_resume(command, resumes, signum, monkeypatch,
                                                                          caplog):
    """Ctrl-C or SIGTERM in any command: "resume" where a rerun continues (finished folds,
    trials or chunks kept), "start again" where the output is written whole or not at all."""
    import importlib

    if signum == signal.SIGTERM and signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
        pytest.skip("the test runner has its own SIGTERM handler, which the command line leaves alone")
    module = importlib.import_module(cli.COMMANDS[command])

    def stopped(args):
        os.kill(os.getpid(), signum)
        time.sleep(10)  # the handler raises at once
        raise AssertionError("the signal did not stop the command")

    monkeypatch.setattr(module, "run", stopped)
    parser = cli.build_parser()
    args = argparse.Namespace(log_level="INFO", _run=module.run)
    caplog.clear()
    with caplog.at_level(logging.ERROR):
        status = cli._execute(args)
    assert status == (130 if signum == signal.SIGINT else 143)
    [line] = _errors(caplog)
    assert ("rerun the same command to resume" in line) == resumes, line
    assert ("nothing was written" in line and "start again" in line) == (not resumes), line
    assert parser  # every command is registered


def test_an_ignored_sigterm_stays_ignored(monkeypatch, tmp_path):
    import geneformer_peft.commands.split as split_command

    seen = []
    monkeypatch.setattr(split_command, "run", lambda args: seen.append(signal.getsignal(signal.SIGTERM)) or 0)
    previous = signal.signal(signal.SIGTERM, signal.SIG_IGN)
    try:
        assert cli.main(["split", "--input", "a", "--dataset_name", "x", "--output_dir", str(tmp_path)]) == 0
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert seen == [signal.SIG_IGN]


def test_terminated_classes_are_keyboard_interrupts():
    """So that every cleanup path that runs for Ctrl-C runs for SIGTERM."""
    assert issubclass(Terminated, KeyboardInterrupt) and issubclass(RunTerminated, KeyboardInterrupt)


def test_sigterm_during_finetune_exit_143_lock_released_and_resumes(job_data, tmp_path, caplog):
    argv = job_data.finetune_argv(tmp_path, "--prompt_type", "lora", "--folds", "0", "--epoch", "60",
                                  "--early_stopping_patience", "0", "--baselines", "none")
    run = jf.run_dir(tmp_path, "lora", job_data)
    checkpoint = run / ".resume" / "0" / "epoch_checkpoint.pt"
    proc = subprocess.Popen([sys.executable, "-m", "geneformer_peft.cli", "finetune", *argv], env=jf._subprocess_env(),
                            cwd=jf.ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 300
        while not checkpoint.is_file() and proc.poll() is None:
            assert time.monotonic() < deadline, "fold 0 never wrote a checkpoint"
            time.sleep(0.1)
        assert proc.poll() is None, "the run ended before it could be terminated"
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 143, stderr[-3000:]
    assert "Traceback" not in stderr
    last = _last_line(stderr)
    assert "terminated (SIGTERM) during fold 0 epoch " in last and "rerun the same command to resume" in last, last
    run_log = (run / "run.log").read_text()
    assert "run stopped: terminated (SIGTERM) during fold 0 epoch" in run_log[run_log.rindex(" ERROR "):]
    assert not (run / ".lock").exists(), "the lock is released on SIGTERM"
    assert checkpoint.is_file() and not (run / "0").exists()
    with caplog.at_level(logging.INFO):
        assert jf.run_finetune(argv) == 0
    assert "fold 0: resuming after epoch" in caplog.text
    assert (run / "0" / "fold_done.json").is_file()


def test_ulimit_f_in_embed_to_h5ad_is_one_line_exit_2(tmp_path):
    """h5py crashes the process (exit 139) when its own write fails: the .h5ad is built in memory
    and written as plain bytes instead."""
    example = jf.ROOT / "example_py" / "data" / "synthetic" / "0" / "synthetic_test0.dataset"
    out = tmp_path / "emb.h5ad"
    proc = _cli(["embed", "--model_path", str(jf.ROOT / "Pretrain_ckpts" / "geneformer-tiny-example"),
                 "--input", str(example), "--output", str(out), "--device", "cpu", "--no_plots"],
                preexec_fn=_fsize_limited(16384))
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    last = _last_line(proc.stderr)
    assert "file too large (ulimit -f?) while writing " in last and "emb.h5ad" in last, last
    assert not out.exists()
