"""``search --storage`` (issue 25): several processes or machines share one study through a
PostgreSQL server or a journal file. The PostgreSQL test starts a real server on this machine
(the system's ``initdb``/``pg_ctl``; skipped, with the reason, when there is none or no driver)."""
from __future__ import annotations

import glob
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

import job_factories as jf
from geneformer_peft import cli
from geneformer_peft.errors import DataError
from geneformer_peft.training.search import check_storage

SPACE = {"lr": {"low": 1e-3, "high": 1e-2, "log": True}, "lora_r": {"choices": [2, 4]}}


def _argv(job_data, out, space, *extra):
    return ["search", "--dataset_name", job_data.dataset_name, "--data_path", str(job_data.data_path),
            "--model_path", str(job_data.model_path), "--prompt_type", "lora", "--space", str(space),
            "--output_dir", str(out), "--folds", "0", *jf.FAST_FLAGS, "--epoch", "1", "--num_threads", "1", *extra]


def _pg_bin(name: str) -> str | None:
    found = shutil.which(name) or sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"))
    return found if isinstance(found, str) else (found[-1] if found else None)


@pytest.fixture(scope="module")
def postgres_url():
    """A fresh PostgreSQL server on a free local port, as the current user or, under root
    (which PostgreSQL refuses), as ``nobody``; stopped at the end."""
    initdb, pg_ctl = _pg_bin("initdb"), _pg_bin("pg_ctl")
    if not (initdb and pg_ctl):
        pytest.skip("no PostgreSQL server binaries (initdb, pg_ctl) on this machine: apt-get install postgresql")
    pytest.importorskip("psycopg", reason="no PostgreSQL driver: pip install 'psycopg[binary]'")
    as_user: list[str] = []
    root = Path(tempfile.mkdtemp(prefix="gf_pg_"))
    if os.geteuid() == 0:
        if not shutil.which("runuser"):
            pytest.skip("running as root without runuser: PostgreSQL refuses to run as root")
        as_user = ["runuser", "-u", "nobody", "--"]
        os.chmod(root, 0o755)
        shutil.chown(root, "nobody")
    data = root / "data"
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    try:
        subprocess.run(as_user + [initdb, "-D", str(data), "-U", "postgres", "-A", "trust", "--no-sync"],
                       check=True, capture_output=True, text=True, timeout=120)
        subprocess.run(as_user + [pg_ctl, "-D", str(data), "-l", str(root / "server.log"), "-w", "-t", "60",
                                  "-o", f"-p {port} -h 127.0.0.1 -k {root} -F", "start"],
                       check=True, capture_output=True, text=True, timeout=120)
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired, OSError) as error:
        log = (root / "server.log").read_text() if (root / "server.log").exists() else ""
        shutil.rmtree(root, ignore_errors=True)
        pytest.skip(f"PostgreSQL could not start: {getattr(error, 'stderr', '') or error} {log[-500:]}")
    try:
        yield f"postgresql://postgres@127.0.0.1:{port}/postgres"
    finally:
        subprocess.run(as_user + [pg_ctl, "-D", str(data), "-m", "immediate", "stop"], capture_output=True,
                       timeout=60)
        shutil.rmtree(root, ignore_errors=True)


def test_two_workers_share_a_postgresql_study(job_data, tmp_path, postgres_url):
    import optuna

    space = tmp_path / "space.json"
    space.write_text(json.dumps(SPACE))
    requested = {"a": 1, "b": 1}  # each process adds its own --n_trials; as two machines, two output folders
    procs = {name: subprocess.Popen(
        [sys.executable, "-m", "geneformer_peft.cli",
         *_argv(job_data, tmp_path / name, space, "--storage", postgres_url, "--n_trials", str(n))],
        cwd=jf.ROOT, env=jf._subprocess_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        for name, n in requested.items()}
    for proc in procs.values():
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err[-3000:]
    study = optuna.load_study(study_name="search", storage=postgres_url)
    assert sorted(t.number for t in study.trials) == list(range(sum(requested.values())))
    assert {t.state.name for t in study.trials} <= {"COMPLETE", "PRUNED"}
    assert not (tmp_path / "a" / "study.db").exists()
    # each folder's outputs from the whole study (run no trial): both name the study's best
    for name in requested:
        assert cli.main(_argv(job_data, tmp_path / name, space, "--storage", postgres_url, "--n_trials", "0")) == 0
    best = [json.loads((tmp_path / name / "best_flags.json").read_text()) for name in requested]
    assert best[0] == best[1]
    assert best[0]["trial"] == study.best_trial.number and best[0]["validation_macro_f1"] == study.best_value


def test_journal_file_study_and_bad_storage_values(job_data, tmp_path, caplog):
    import optuna

    space = tmp_path / "space.json"
    space.write_text(json.dumps(SPACE))
    journal = tmp_path / "shared" / "study.journal"
    journal.parent.mkdir()
    for name in ("m1", "m2"):  # two "machines" in turn, one journal on the shared filesystem
        assert cli.main(_argv(job_data, tmp_path / name, space, "--storage", f"journal:{journal}",
                              "--n_trials", "1")) == 0
    from optuna.storages.journal import JournalFileBackend, JournalStorage

    study = optuna.load_study(study_name="search", storage=JournalStorage(JournalFileBackend(str(journal))))
    assert [t.number for t in study.trials] == [0, 1]
    assert json.loads((tmp_path / "m2" / "best_flags.json").read_text())["trial"] == study.best_trial.number

    with pytest.raises(DataError, match="neither a URL nor journal:PATH"):
        check_storage("study.db")
    with pytest.raises(DataError, match="folder .*missing.* does not exist"):
        check_storage(f"journal:{tmp_path / 'missing' / 'x.journal'}")
    with pytest.raises(DataError, match="'redis' is not one"):
        check_storage("redis://localhost:6379")
    assert cli.main(_argv(job_data, tmp_path / "m3", space, "--storage", "postgresql://u:secret@127.0.0.1:1/db",
                          "--n_trials", "1")) == 2
    assert "cannot connect" in caplog.text and "secret" not in caplog.text
