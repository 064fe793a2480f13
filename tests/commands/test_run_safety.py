"""One run-safety mechanism for every command that writes (issue 22): for tokenize, split,
pretrain, predict, embed, remap-vocab and convert-scbert alike, a second job on the same output
is refused (exit 2) and the first result stays; an existing output is refused naming the
settings that differ; an interrupted --overwrite leaves the old result byte-identical; an
output written by another job while this one ran is not replaced; temporaries of a dead
process are removed on the next run, those of a live one kept."""
from __future__ import annotations

import json
import logging
import os
import pickle
import socket
import subprocess
import sys
from pathlib import Path

import job_factories as jf
import pytest

from analysis_factories import make_cells, save_cells, token_dictionary
from bert_factories import ours_tiny_model
from data_factories import make_adata, make_vocab
from geneformer_peft.cli import main
from geneformer_peft.training.run_safety import PROVENANCE_SUFFIX

HOST = socket.gethostname()


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, job_data):
    """Tiny inputs of every command: raw counts and dictionaries, tokenized cells, a checkpoint
    with its vocabulary, a fine-tuned fold, a released scBERT file."""
    root = tmp_path_factory.mktemp("safety_inputs")
    adata = make_adata(30, 20, seed=5)
    adata.write_h5ad(root / "cells.h5ad")
    tokens, medians = make_vocab(list(adata.var_names), seed=5)
    (root / "tokens.pkl").write_bytes(pickle.dumps(tokens))
    (root / "medians.pkl").write_bytes(pickle.dumps(medians))
    ckpt = root / "ckpt"
    ours_tiny_model("BertForMaskedLM", seed=2).save_pretrained(ckpt)
    (ckpt / "token_dictionary.pkl").write_bytes(pickle.dumps(token_dictionary()))
    save_cells(make_cells(10, v2=True, seed=5), root / "v2.dataset")
    old = {str(k): int(v) for k, v in job_data.token_dictionary.items()}
    genes = [g for g in old if not g.startswith("<")]
    (root / "old.pkl").write_bytes(pickle.dumps(old))
    (root / "new.pkl").write_bytes(pickle.dumps({"<pad>": 0, "<mask>": 1, **{g: i + 2 for i, g in
                                                                          enumerate(genes[:20])}}))
    run = tmp_path_factory.mktemp("safety_fold")
    assert jf.run_finetune(job_data.finetune_argv(run, "--prompt_type", "lora", "--folds", "0",
                                                  "--epoch", "1", "--baselines", "none")) == 0
    return {"root": root, "ckpt": ckpt, "fold": jf.run_dir(run, "lora", job_data) / "0"}


def _tokenize(i, job_data, out):
    return ["tokenize", "--input", str(i["root"] / "cells.h5ad"), "--output", str(out), "--token_dictionary",
            str(i["root"] / "tokens.pkl"), "--gene_median_dictionary", str(i["root"] / "medians.pkl"),
            "--label_column", "cell_type", "--model_input_size", "16", "--no_progress"]


def _split(i, job_data, out):
    return ["split", "--input", str(job_data.cells), "--dataset_name", out.name, "--output_dir", str(out.parent),
            "--n_folds", "2"]


def _pretrain(i, job_data, out):
    return ["pretrain", "--input", str(job_data.cells), "--output_dir", str(out), "--model_path",
            str(job_data.model_path), "--max_steps", "1", "--batch_size", "8", "--device", "cpu"]


def _predict(i, job_data, out):
    return ["predict", "--model_path", str(i["fold"]), "--input", str(job_data.fold_file(0, "test")),
            "--output", str(out), "--device", "cpu"]


def _embed(i, job_data, out):
    return ["embed", "--model_path", str(i["ckpt"]), "--input", str(i["root"] / "v2.dataset"), "--output", str(out),
            "--device", "cpu", "--no_plots"]


def _remap(i, job_data, out):
    return ["remap-vocab", "--model_path", str(job_data.model_path), "--old_token_dictionary",
            str(i["root"] / "old.pkl"), "--token_dictionary", str(i["root"] / "new.pkl"), "--output_dir", str(out)]


def _convert(i, job_data, out):
    return ["convert-scbert", "--checkpoint", str(i["pth"]), "--output_dir", str(out)]


#: command -> (argv of an output, output name, library function it calls to write, a changed setting
#: and the key it shows as, output is a folder)
CASES = {
    "tokenize": (_tokenize, "cells.dataset", "geneformer_peft.data.rank_value.tokenize_anndata",
                 ("--model_input_size", "12"), "options.model_input_size", True),
    "split": (_split, "toy", "geneformer_peft.data.folds.split_folds", ("--seed", "3"), "options.seed", True),
    "pretrain": (_pretrain, "ckpt", "geneformer_peft.training.pretrain.pretrain", ("--lr", "0.01"), "options.lr",
                 True),
    "predict": (_predict, "p.csv", "geneformer_peft.evaluation.prediction.predict_cells", ("--batch_size", "7"),
                "options.batch_size", False),
    "embed": (_embed, "e.csv", "geneformer_peft.analysis.runs.run_embed", ("--emb_layer", "0"), "options.emb_layer",
              False),
    "remap-vocab": (_remap, "remapped", "geneformer_peft.models.vocabulary.remap_checkpoint_vocabulary",
                    ("--seed", "1"), "options.seed", True),
    "convert-scbert": (_convert, "converted", "transformerslocal.convert_scbert.convert_scbert_checkpoint",
                       ("--key_stabilizer", "head"), "options.key_stabilizer", True),
}


def _snapshot(path: Path, skip: str = "~y") -> dict[str, bytes]:
    """Every file under ``path`` (or the file) and its bytes, but the live job's temporary."""
    if path.is_file():
        return {"": path.read_bytes()}
    return {p.relative_to(path).as_posix(): p.read_bytes() for p in sorted(path.rglob("*"))
            if p.is_file() and skip not in p.relative_to(path).parts[0]}


def _error(caplog) -> str:
    return " ".join(r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR)


def _patch_after(monkeypatch, target: str, then):
    """Let the command's library function do its work, then call ``then``."""
    import importlib

    module_name, attr = target.rsplit(".", 1)
    module = importlib.import_module(module_name)
    real = getattr(module, attr)

    def wrapped(*args, **kwargs):
        result = real(*args, **kwargs)
        then()
        return result

    monkeypatch.setattr(module, attr, wrapped)


@pytest.mark.parametrize("command", list(CASES))
def test_command_output_is_guarded(command, inputs, job_data, tmp_path, monkeypatch, caplog):
    build, name, target, (flag, value), key, is_dir = CASES[command]
    if command == "convert-scbert":
        pytest.importorskip("performer_pytorch")
        from performer_factories import reference_lm, released_state_dict, write_released_pth

        inputs = {**inputs, "pth": write_released_pth(tmp_path / "panglao.pth",
                                                      released_state_dict(reference_lm(seed=3)))}
    out = tmp_path / "out" / name
    argv = build(inputs, job_data, out)
    assert main(argv) == 0
    first = _snapshot(out.parent)  # the output and what lies beside it (provenance, report)
    record = json.loads((out / "provenance.json" if is_dir else out.with_name(name + PROVENANCE_SUFFIX)).read_text())
    assert record["command"] == command and record["settings"]["inputs"]

    # a second job while the first holds the output: refused at once, the first one's result stays
    lock = out.with_name(name + ".lock")
    lock.write_text(json.dumps({"pid": os.getppid(), "host": HOST, "started_at": "now"}))
    caplog.clear()
    assert main(argv) == 2
    assert str(out) in _error(caplog) and str(lock) in _error(caplog)
    lock.unlink()
    # a rerun: refused, naming what differs
    caplog.clear()
    assert main(argv) == 2
    assert "exists already" in _error(caplog) and "same settings" in _error(caplog)
    caplog.clear()
    assert main([*argv, flag, value]) == 2
    assert f"{key}: " in _error(caplog) and "(recorded) ->" in _error(caplog)
    assert _snapshot(out.parent) == first

    # debris of a killed job is removed on the next run; a live job's temporary is left alone
    dead = out.with_name(f"{name}.tmp-{_dead_pid()}@{HOST}~x")
    live = out.with_name(f"{name}.tmp-{os.getppid()}@{HOST}~y")
    for debris in (dead, live):
        debris.mkdir()
        (debris / "half").write_text("half")

    # --overwrite interrupted after the new result was built: the old one stays, byte for byte
    def interrupt():
        raise KeyboardInterrupt

    _patch_after(monkeypatch, target, interrupt)
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        assert main([*argv, "--overwrite"]) == 130
    assert _snapshot(out.parent) == first
    assert not dead.exists() and live.is_dir() and str(dead) in caplog.text
    assert sorted(p.name for p in out.parent.iterdir()) == sorted({n.split("/")[0] for n in first} | {live.name})

    # another job (one that takes no lock) writes the output meanwhile: this run's result is not
    # kept, the other's stays, and the command says so
    other = tmp_path / "out2" / name
    other.parent.mkdir()

    def someone_else_writes():
        if is_dir:
            other.mkdir()
            (other / "theirs").write_text("theirs")
        else:
            other.write_text("theirs")

    monkeypatch.undo()
    _patch_after(monkeypatch, target, someone_else_writes)
    caplog.clear()
    assert main(build(inputs, job_data, other)) == 2
    assert str(other) in _error(caplog) and "another job" in _error(caplog)
    assert _snapshot(other) == {"theirs" if is_dir else "": b"theirs"}
    assert sorted(p.name for p in other.parent.iterdir()) == [name]


# ----------------------------------------------------------------------------- failed writes per command


def _finetune(i, job_data, out):
    return ["finetune", *job_data.finetune_argv(out, "--prompt_type", "lora", "--folds", "0", "--epoch", "1",
                                                "--baselines", "none")]


#: issue 22's commands whose failed writes ended in a traceback: argv of an output under a folder
FAULT_COMMANDS = {"finetune": (_finetune, "run"), "tokenize": (_tokenize, "cells.dataset"),
                  "embed": (_embed, "e.csv"), "predict": (_predict, "p.csv")}


def _cli_under(argv: list[str], *, mount: Path | None = None, options: str = "", fsize: int | None = None):
    """``geneformer-peft ARGV`` in a subprocess, under a private tmpfs mounted at ``mount`` with
    ``options`` and/or a ``ulimit -f`` of ``fsize`` bytes."""
    import shlex

    command = [sys.executable, "-m", "geneformer_peft.cli", *argv]
    if mount is not None:
        command = ["unshare", "-rm", "sh", "-c",
                   f"mount -t tmpfs -o {options} tmpfs {shlex.quote(str(mount))} && exec {shlex.join(command)}"]

    def limit() -> None:
        import resource

        resource.setrlimit(resource.RLIMIT_FSIZE, (fsize, resource.RLIM_INFINITY))

    return subprocess.run(command, cwd=jf.ROOT, env=jf._subprocess_env(), capture_output=True, text=True,
                          timeout=300, preexec_fn=limit if fsize is not None else None)


def _one_line(proc, reason: str, where: Path) -> None:
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr and "Logging error" not in proc.stderr, proc.stderr[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert reason in last and str(where) in last and ".tmp-" not in last, last


def _tmpfs_works() -> bool:
    import job_factories

    return job_factories.private_tmpfs_works()


@pytest.mark.parametrize("command", list(FAULT_COMMANDS))
@pytest.mark.parametrize("fault", ["read-only", "full disk"])
def test_a_read_only_or_full_output_folder_is_one_line_exit_2(fault, command, inputs, job_data, tmp_path):
    """The output under a private tmpfs, mounted read-only or holding one page (the lock fills it)."""
    if not _tmpfs_works():
        pytest.skip("no private mount namespace (unshare -rm) to mount a tmpfs in")
    build, name = FAULT_COMMANDS[command]
    mount = tmp_path / "mnt"
    mount.mkdir()
    options, reason = {"read-only": ("size=1m,ro", "read-only file system: "),
                       "full disk": ("size=4k", "no space left on device while writing ")}[fault]
    _one_line(_cli_under(build(inputs, job_data, mount / name), mount=mount, options=options), reason, mount)


@pytest.mark.parametrize("command", list(FAULT_COMMANDS))
def test_ulimit_f_is_one_line_exit_2(command, inputs, job_data, tmp_path):
    build, name = FAULT_COMMANDS[command]
    out = tmp_path / "out" / name
    _one_line(_cli_under(build(inputs, job_data, out), fsize=1024), "file too large (ulimit -f?) while writing ",
              tmp_path / "out")
    assert not out.exists() or command == "finetune" and not list(out.rglob("fold_done.json"))
