"""``embed`` and ``perturb`` under torchrun (issue 25): 2 CPU ranks (gloo) each take a share of
the cells; rank 0 writes one output, in input order, identical to one process."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

pytest.importorskip("transformers", reason="the tiny checkpoint is written with HuggingFace transformers")

import job_factories as jf  # noqa: E402
from analysis_factories import hf_checkpoint, make_cells, save_cells  # noqa: E402
from geneformer_peft.training import distributed  # noqa: E402

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import torchrun_analyses  # noqa: E402


def test_two_ranks_write_what_one_process_writes(tmp_path):
    hf_checkpoint(tmp_path / "ckpt")
    save_cells(make_cells(14, v2=True, seed=3, min_genes=6, max_genes=20, always=(20,)), tmp_path / "cells.dataset")
    args = [str(tmp_path / "ckpt"), str(tmp_path / "cells.dataset")]
    torchrun_analyses.main(*args, str(tmp_path / "one"))
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         str(HERE / "torchrun_analyses.py"), *args, str(tmp_path / "two")],
        capture_output=True, text=True, timeout=300, env=jf._subprocess_env(), cwd=jf.ROOT)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "rank 0 of 2 done" in proc.stdout and "rank 1 of 2 done" in proc.stdout

    one, two = (pd.read_parquet(tmp_path / run / "emb.parquet") for run in ("one", "two"))
    assert len(one) == 14
    pd.testing.assert_frame_equal(two, one, check_exact=True)  # input order, same values
    for name in ("perturbations.parquet", "gene_stats.csv"):
        read = pd.read_parquet if name.endswith(".parquet") else pd.read_csv
        pd.testing.assert_frame_equal(read(tmp_path / "two" / "scan" / name), read(tmp_path / "one" / "scan" / name),
                                      check_exact=True)
    # 5 chunks of 3 cells: rank 0 computed 0, 2, 4 and rank 1 the others, each in its own file
    assert sorted(p.name for p in (tmp_path / "two" / "scan" / "chunks").glob("results_*")) == [
        f"results_{c:05d}.parquet" for c in range(5)]


def test_gather_rows_in_one_process_puts_rows_in_input_order():
    values = np.arange(6, dtype=np.float32).reshape(3, 2)
    out = distributed.gather_rows(np.array([2, 0, 1]), values, 3)
    assert out.tolist() == [[2, 3], [4, 5], [0, 1]]
    with pytest.raises(RuntimeError, match="not given exactly once"):
        distributed.gather_rows(np.array([0, 0, 1]), values, 3)
    assert list(distributed.shard_of(5)) == [0, 1, 2, 3, 4]


def test_the_commands_under_torchrun_guard_and_report_once(tmp_path):
    """``torchrun -m geneformer_peft.cli embed|perturb``: rank 0 alone takes the output's lock
    (another rank's lock attempt refused the run) and prints the summary (every rank did)."""
    hf_checkpoint(tmp_path / "ckpt")
    save_cells(make_cells(10, v2=True, seed=3, min_genes=6, max_genes=20, always=(20,)), tmp_path / "cells.dataset")
    common = ["--model_path", str(tmp_path / "ckpt"), "--input", str(tmp_path / "cells.dataset"), "--device", "cpu",
              "--no_plots", "--batch_size", "4"]
    for argv, line in ((["embed", *common, "--output", str(tmp_path / "emb.csv")], "embeddings -> "),
                       (["perturb", *common, "--output_dir", str(tmp_path / "scan"), "--genes", "ENSGTEST0000020",
                         "--perturb_type", "delete", "--chunk_cells", "3", "--n_null", "2"], " perturbations of ")):
        proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                               "-m", "geneformer_peft.cli", *argv],
                              capture_output=True, text=True, timeout=300, env=jf._subprocess_env(), cwd=jf.ROOT)
        assert proc.returncode == 0, proc.stderr[-4000:]
        assert proc.stdout.count(line) == 1, proc.stdout
    assert len(pd.read_csv(tmp_path / "emb.csv")) == 10
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(("emb", ".emb"))) == [
        "emb.csv", "emb.csv.provenance.json", "embedding_metrics.json"]
    assert (tmp_path / "scan" / "gene_stats.csv").is_file() and not (tmp_path / "scan" / ".lock").exists()
