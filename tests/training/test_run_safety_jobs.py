"""Run safety of the jobs that resume (issue 22): an interrupted ``finetune --overwrite`` or
``classify-genes --overwrite`` leaves the finished fold byte-identical and the summary true;
``classify-genes`` refuses to reuse folds made with another --lr or --input; stale temporaries
of a dead process are removed, a live one's kept; ``perturb`` takes its folder's lock and names
the settings that differ."""
from __future__ import annotations

import json
import logging
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import job_factories as jf
import pytest

from geneformer_peft import cli
from geneformer_peft.errors import TrainingDiverged
from geneformer_peft.files import atomic_file, temp_owner
from geneformer_peft.training import trainer as trainer_module
from geneformer_peft.training.run_safety import clean_stale_temps

HOST = socket.gethostname()


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def _files(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _error(caplog) -> str:
    return " ".join(r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR)


def test_interrupted_finetune_overwrite_keeps_the_finished_fold(job_data, tmp_path, monkeypatch):
    argv = job_data.finetune_argv(tmp_path, "--prompt_type", "lora", "--folds", "0", "--epoch", "1",
                                  "--baselines", "none")
    assert jf.run_finetune(argv) == 0
    run = jf.run_dir(tmp_path, "lora", job_data)
    fold, summary = _files(run / "0"), {n: (run / n).read_bytes() for n in ("summary.json", "summary.csv")}
    dead = run / f"1.tmp-{_dead_pid()}@{HOST}~x"  # a fold folder half-written by a killed job
    dead.mkdir()

    for stop in (KeyboardInterrupt, TrainingDiverged):  # Ctrl-C, divergence
        def fit(self, stop=stop):
            raise stop("stopped")

        monkeypatch.setattr(trainer_module.FoldTrainer, "fit", fit)
        assert jf.run_finetune([*argv, "--overwrite"]) not in (0, None)
        assert _files(run / "0") == fold, f"the finished fold is untouched ({stop.__name__})"
        assert {n: (run / n).read_bytes() for n in summary} == summary
        assert not dead.exists() and not [p.name for p in run.iterdir() if ".tmp-" in p.name or ".old-" in p.name]
    monkeypatch.undo()
    # a complete overwrite replaces it
    assert jf.run_finetune([*argv, "--overwrite", "--seed", "4"]) == 0
    assert jf.read_json(run / "0" / "provenance.json")["settings"]["training"]["seed"] == 4


def test_finetune_overwrite_on_a_full_disk_keeps_the_finished_fold(job_data, tmp_path, monkeypatch, caplog):
    """The third way the issue lost a fold: the disk fills while the new fold is written."""
    import errno

    argv = job_data.finetune_argv(tmp_path, "--prompt_type", "lora", "--folds", "0", "--epoch", "1",
                                  "--baselines", "none")
    assert jf.run_finetune(argv) == 0
    run = jf.run_dir(tmp_path, "lora", job_data)
    fold, summary = _files(run / "0"), {n: (run / n).read_bytes() for n in ("summary.json", "summary.csv")}

    def fit(self):
        raise OSError(errno.ENOSPC, "No space left on device", str(run / "0.tmp-x" / "model.safetensors"))

    monkeypatch.setattr(trainer_module.FoldTrainer, "fit", fit)
    caplog.clear()
    assert jf.run_finetune([*argv, "--overwrite"]) == 2
    assert "no space left on device while writing " in _error(caplog)
    assert _files(run / "0") == fold and {n: (run / n).read_bytes() for n in summary} == summary
    assert not [p.name for p in run.iterdir() if ".tmp-" in p.name or ".old-" in p.name]


# ----------------------------------------------------------------------------- classify-genes


@pytest.fixture(scope="module")
def gene_run(job_data, tmp_path_factory):
    root = tmp_path_factory.mktemp("safety_genes")
    genes = sorted(g for g in job_data.token_dictionary if not g.startswith("<"))
    (root / "classes.json").write_text(json.dumps({"a": genes[0:40:2], "b": genes[1:40:2]}))
    shutil.copytree(job_data.cells, root / "cells_copy.dataset")
    return root


def _genes_argv(job_data, root, out, *extra):
    return ["classify-genes", "--gene_classes", str(root / "classes.json"), "--input", str(job_data.cells),
            "--model_path", str(job_data.model_path), "--output_path", str(out), "--n_folds", "3", "--folds", "0",
            "--epoch", "1", "--lr", "3e-3", "--prompt_type", "lora", "--no_progress", "--device", "cpu",
            "--token_dictionary", str(root / "tokens.pkl"), *extra]


def test_classify_genes_refuses_other_settings_and_keeps_folds_through_an_interrupted_overwrite(
        job_data, gene_run, tmp_path, monkeypatch, caplog):
    import pickle

    from geneformer_peft.training import gene_classification

    (gene_run / "tokens.pkl").write_bytes(pickle.dumps({str(k): int(v) for k, v in job_data.token_dictionary.items()}))
    out = tmp_path / "out"
    argv = _genes_argv(job_data, gene_run, out)
    assert cli.main(argv) == 0
    run = out / "lora"
    fold = _files(run / "0")
    assert "provenance.json" in fold

    caplog.clear()
    assert cli.main([*argv, "--lr", "1e-3"]) == 2
    assert "training.lr: 0.003 (recorded) -> 0.001 (now)" in _error(caplog) and "--overwrite" in _error(caplog)
    argv_input = list(argv)
    argv_input[argv_input.index("--input") + 1] = str(gene_run / "cells_copy.dataset")
    caplog.clear()
    assert cli.main(argv_input) == 2
    assert "options.input:" in _error(caplog)
    # the same settings: the finished fold is reused
    assert cli.main(argv) == 0
    assert _files(run / "0") == fold

    # a second job on the run folder is refused at once
    (run / ".lock").write_text(json.dumps({"pid": os.getppid(), "host": HOST, "started_at": "now"}))
    caplog.clear()
    assert cli.main(argv) == 2
    assert str(run / ".lock") in _error(caplog)
    (run / ".lock").unlink()

    real = gene_classification._evaluate

    def evaluate_then_stop(*args, **kwargs):
        real(*args, **kwargs)
        raise KeyboardInterrupt

    monkeypatch.setattr(gene_classification, "_evaluate", evaluate_then_stop)
    summary = (run / "summary.json").read_bytes()
    assert cli.main([*argv, "--lr", "1e-3", "--overwrite"]) == 130
    assert _files(run / "0") == fold and (run / "summary.json").read_bytes() == summary
    monkeypatch.undo()
    assert cli.main([*argv, "--lr", "1e-3", "--overwrite"]) == 0
    assert jf.read_json(run / "0" / "provenance.json")["settings"]["options"]["training"]["lr"] == 1e-3


# ----------------------------------------------------------------------------- perturb


def test_perturb_takes_its_folder_lock_and_names_changed_settings(tmp_path, caplog):
    import pickle

    from analysis_factories import make_cells, save_cells, token_dictionary
    from bert_factories import ours_tiny_model

    ckpt = tmp_path / "ckpt"
    ours_tiny_model("BertForMaskedLM", seed=2).save_pretrained(ckpt)
    (ckpt / "token_dictionary.pkl").write_bytes(pickle.dumps(token_dictionary()))
    save_cells(make_cells(4, v2=True, seed=1, min_genes=6, max_genes=10), tmp_path / "cells.dataset")
    out = tmp_path / "scan"
    argv = ["perturb", "--model_path", str(ckpt), "--input", str(tmp_path / "cells.dataset"), "--output_dir",
            str(out), "--perturb_type", "delete", "--genes", "all", "--n_null", "2", "--device", "cpu",
            "--no_plots"]
    out.mkdir()
    (out / ".lock").write_text(json.dumps({"pid": os.getppid(), "host": HOST, "started_at": "now"}))
    caplog.clear()
    assert cli.main(argv) == 2
    assert str(out / ".lock") in _error(caplog) and not (out / "scan.json").exists()
    (out / ".lock").unlink()
    assert cli.main(argv) == 0
    assert not (out / ".lock").exists()
    caplog.clear()
    assert cli.main([*argv, "--perturb_type", "overexpress"]) == 2
    assert "settings.perturb_type" in _error(caplog) and "(recorded) ->" in _error(caplog)


# ----------------------------------------------------------------------------- the mechanism


def test_stale_temporaries_removed_only_when_their_owner_is_dead(tmp_path, caplog):
    dead = _dead_pid()
    (tmp_path / "out.csv").write_text("current")
    stale_file = tmp_path / f".out.csv.tmp-{dead}@{HOST}~ab.csv"
    stale_file.write_text("half")
    live = tmp_path / f"out.csv.tmp-{os.getpid()}@{HOST}~cd"
    live.mkdir()
    remote = tmp_path / f"out.csv.tmp-{dead}@some-other-host~ef"
    remote.mkdir()
    # killed between moving the old result aside and moving the new one in: the old one comes back
    aside = tmp_path / f"model.old-{dead}@{HOST}~gh"
    aside.mkdir()
    (aside / "weights").write_text("old")
    unrelated = tmp_path / "notes.tmp-by-hand"
    unrelated.write_text("mine")
    with caplog.at_level(logging.WARNING):
        cleaned = clean_stale_temps(tmp_path)
    assert sorted(cleaned) == sorted([stale_file, aside])
    assert not stale_file.exists() and live.is_dir() and remote.is_dir() and unrelated.is_file()
    assert (tmp_path / "model" / "weights").read_text() == "old"
    assert "some-other-host" in caplog.text and str(stale_file) in caplog.text
    assert temp_owner(f"x.tmp-12@a.b-c~k") == ("x", "tmp", 12, "a.b-c")


def test_atomic_file_without_overwrite_never_replaces_a_file_that_appeared(tmp_path):
    target = tmp_path / "t.txt"
    with pytest.raises(FileExistsError, match="appeared"):
        with atomic_file(target, overwrite=False) as tmp:
            Path(tmp).write_text("mine")
            target.write_text("theirs")
    assert target.read_text() == "theirs" and sorted(p.name for p in tmp_path.iterdir()) == ["t.txt"]
