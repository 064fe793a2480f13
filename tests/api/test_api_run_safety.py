"""gp.predict(output=) and gp.embed(output=) write through the run-safety guard of the commands
they mirror (issue 22): a second job on the output is refused, an existing output is refused
naming the settings that differ (an output the command wrote is recognised as made with the same
settings), ``overwrite=True`` keeps the old output until the new one is complete, provenance is
recorded beside it."""
from __future__ import annotations

import json
import os
import socket

import pytest

import geneformer_peft as gp
from geneformer_peft.cli import main
from geneformer_peft.errors import DataError
from geneformer_peft.training.run_safety import PROVENANCE_SUFFIX


@pytest.fixture(scope="module")
def lora_fold(finished_runs):
    return finished_runs("lora") / "0"


def _predict(job_data, fold, out, **options):
    return gp.predict(job_data.cells, model=fold, output=out, device="cpu", **options)


def _embed(job_data, vocab, out, **options):
    return gp.embed(job_data.cells, model=job_data.model_path, output=out, token_dictionary=vocab[0], plots=False,
                    device="cpu", **options)


def _guarded_like_the_command(call, argv, out, changed, key, tmp_path, monkeypatch, library):
    assert main(argv) == 0
    first = out.read_bytes()
    record = json.loads(out.with_name(out.name + PROVENANCE_SUFFIX).read_text())
    # the command's output: the API call with the same settings is told so, nothing replaced
    with pytest.raises(DataError, match="same settings"):
        call()
    with pytest.raises(DataError, match=rf"{key}: .*\(recorded\) ->"):
        call(**changed)
    assert out.read_bytes() == first
    # a job holding the output's lock: refused at once
    lock = out.with_name(out.name + ".lock")
    lock.write_text(json.dumps({"pid": os.getppid(), "host": socket.gethostname(), "started_at": "now"}))
    with pytest.raises(DataError, match=str(lock)):
        call(overwrite=True)
    lock.unlink()
    # an overwrite interrupted after the new result was made: the old output stays whole
    module_name, attr = library.rsplit(".", 1)
    import importlib

    module = importlib.import_module(module_name)
    real = getattr(module, attr)

    def interrupted(*args, **kwargs):
        real(*args, **kwargs)
        raise KeyboardInterrupt

    monkeypatch.setattr(module, attr, interrupted)
    with pytest.raises(KeyboardInterrupt):
        call(overwrite=True, **changed)
    monkeypatch.undo()
    assert out.read_bytes() == first
    assert not [p.name for p in out.parent.iterdir() if ".tmp-" in p.name or p.name.endswith(".lock")]
    # a complete overwrite replaces it and records the API call's settings as the command's
    call(overwrite=True, **changed)
    again = json.loads(out.with_name(out.name + PROVENANCE_SUFFIX).read_text())
    assert again["command"] == record["command"] and again["settings"]["inputs"] == record["settings"]["inputs"]
    assert {k for k, v in again["settings"]["options"].items() if record["settings"]["options"].get(k) != v} == {
        key.split(".", 1)[1]}


def test_predict_output_goes_through_the_commands_guard(job_data, lora_fold, tmp_path, monkeypatch):
    out = tmp_path / "p.csv"
    argv = ["predict", "--model_path", str(lora_fold), "--input", str(job_data.cells), "--output", str(out),
            "--device", "cpu"]
    _guarded_like_the_command(lambda **o: _predict(job_data, lora_fold, out, **o), argv, out, {"batch_size": 7},
                              "options.batch_size", tmp_path, monkeypatch,
                              "geneformer_peft.evaluation.prediction.predict_cells")


def test_embed_output_goes_through_the_commands_guard(job_data, vocab, tmp_path, monkeypatch):
    out = tmp_path / "e.csv"
    argv = ["embed", "--model_path", str(job_data.model_path), "--input", str(job_data.cells), "--output", str(out),
            "--no_plots", "--token_dictionary", str(vocab[0]), "--device", "cpu"]
    _guarded_like_the_command(lambda **o: _embed(job_data, vocab, out, **o), argv, out, {"emb_layer": 0},
                              "options.emb_layer", tmp_path, monkeypatch, "geneformer_peft.analysis.runs.run_embed")
    assert (tmp_path / "embedding_metrics.json").is_file()


def test_predict_and_embed_without_output_write_nothing(job_data, lora_fold, vocab, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    frame = gp.predict(job_data.cells, model=lora_fold, device="cpu")
    emb = gp.embed(job_data.cells, model=job_data.model_path, token_dictionary=vocab[0], device="cpu")
    assert len(frame) == emb.n_obs and list(tmp_path.iterdir()) == []


def test_split_recognises_the_commands_folds_as_made_with_the_same_settings(job_data, tmp_path):
    """gp.split records its settings as the command does (the command's name included): the
    command's folds are refused as "the same settings", another seed names only the seed."""
    assert main(["split", "--input", str(job_data.cells), "--dataset_name", "toy", "--output_dir", str(tmp_path),
                 "--n_folds", "2"]) == 0
    with pytest.raises(DataError, match="same settings"):
        gp.split(job_data.cells, dataset_name="toy", output_dir=tmp_path, n_folds=2)
    with pytest.raises(DataError, match=r"It was made with other settings than this command's:\n\s*options\.seed: 0 "
                                        r"\(recorded\) -> 1 \(now\)$"):
        gp.split(job_data.cells, dataset_name="toy", output_dir=tmp_path, n_folds=2, seed=1)
