"""``tokenize_anndata(nproc=N)`` / ``tokenize --nproc N``: chunks encoded in worker processes,
output identical to one process in content and order (issue 25)."""

from __future__ import annotations

import pickle
from pathlib import Path

import datasets
import numpy as np
import pytest

from data_factories import make_adata, make_vocab
from geneformer_peft.cli import main
from geneformer_peft.data.rank_value import tokenize_anndata
from geneformer_peft.errors import DataError


def _tokenize(source, tokens, medians, **kwargs):
    return tokenize_anndata(source, token_dictionary=tokens, gene_median_dictionary=medians, show_progress=False,
                            return_stats=True, **kwargs)


def test_two_processes_write_what_one_writes(tmp_path):
    adata = make_adata(57, 30, seed=2)
    adata.obs["filter_pass"] = [0 if i % 6 == 0 else 1 for i in range(57)]
    adata.var_names = list(adata.var_names[:-1]) + [adata.var_names[0]]  # a repeated gene id: summed
    tokens, medians = make_vocab(list(adata.var_names), seed=2, drop_every=7, extra_specials=["<cls>", "<eos>"])
    path = tmp_path / "cells.h5ad"
    adata.write_h5ad(path)
    common = dict(label_column="cell_type", keep_columns=["batch"], model_input_size=9, chunk_size=4,
                  model_version="V2")
    one, one_stats = _tokenize(str(path), tokens, medians, **common)
    two, two_stats = _tokenize(str(path), tokens, medians, nproc=2, **common)
    assert one.num_rows == 57 - 10
    assert two.to_dict() == one.to_dict()  # content and order
    assert two_stats == one_stats
    assert two.info.description == one.info.description


def test_first_bad_chunk_in_file_order_is_reported(tmp_path):
    adata = make_adata(40, 20, seed=4)
    adata.obs["n_counts"] = np.asarray(adata.X.sum(axis=1)).ravel()
    adata.obs.loc["cell13", "n_counts"] = 0.0
    adata.obs.loc["cell37", "n_counts"] = -1.0
    tokens, medians = make_vocab(list(adata.var_names), seed=4)
    messages = []
    for nproc in (1, 3):
        with pytest.raises(DataError, match="obs\\['n_counts'\\]") as error:
            _tokenize(adata, tokens, medians, chunk_size=3, nproc=nproc)  # an AnnData in memory works too
        messages.append(str(error.value))
    assert messages[0] == messages[1]
    assert "'cell13'" in messages[1]
    with pytest.raises(DataError, match="nproc 0 is not valid"):
        _tokenize(adata, tokens, medians, nproc=0)


def test_cli_nproc(tmp_path, caplog):
    adata = make_adata(30, 25, seed=6)
    adata.write_h5ad(tmp_path / "cells.h5ad")
    tokens, medians = make_vocab(list(adata.var_names), seed=6)
    (tmp_path / "tokens.pkl").write_bytes(pickle.dumps(tokens))
    (tmp_path / "medians.pkl").write_bytes(pickle.dumps(medians))
    argv = ["tokenize", "--input", str(tmp_path / "cells.h5ad"), "--token_dictionary", str(tmp_path / "tokens.pkl"),
            "--gene_median_dictionary", str(tmp_path / "medians.pkl"), "--label_column", "cell_type",
            "--chunk_size", "8", "--no_progress"]
    assert main(argv + ["--output", str(tmp_path / "one.dataset")]) == 0
    assert main(argv + ["--output", str(tmp_path / "two.dataset"), "--nproc", "2"]) == 0
    one, two = (datasets.load_from_disk(str(tmp_path / f"{n}.dataset")) for n in ("one", "two"))
    assert two.to_dict() == one.to_dict()
    assert main(["tokenize", "--input", str(tmp_path / "cells.h5ad"), "--output", str(tmp_path / "b.dataset"),
                 "--encoding", "binned", "--gene_panel", str(tmp_path / "panel.txt"), "--nproc", "2"]) == 2
    assert "--nproc 2 applies to the rank value encoding" in caplog.text


def test_workers_read_their_own_rows_and_leave_one_file(tmp_path, monkeypatch):
    """The parent reads no counts: each worker reads its own row ranges (a dense X, a gene name
    map's column counts and a bad value in the last chunk too), and only the output is left."""
    import os

    from geneformer_peft.data import cell_source

    adata = make_adata(45, 12, seed=8, dense=True)
    adata.obs["n_counts"] = np.asarray(adata.X.sum(axis=1)).ravel() + 1.0
    path = tmp_path / "cells.h5ad"
    adata.write_h5ad(path)
    tokens, medians = make_vocab(list(adata.var_names), seed=8)
    readers = tmp_path / "readers.txt"
    read_rows = cell_source.CellSource.read_rows

    def recording_read_rows(self, start, stop):
        with open(readers, "a") as out:
            out.write(f"{os.getpid()} {start}\n")
        return read_rows(self, start, stop)

    monkeypatch.setattr(cell_source.CellSource, "read_rows", recording_read_rows)
    name_map = {g: g for g in adata.var_names}
    one, one_stats = _tokenize(str(path), tokens, medians, chunk_size=2, gene_name_id_dictionary=name_map,
                               cache_dir=tmp_path / "one")
    readers.unlink()
    two, two_stats = _tokenize(str(path), tokens, medians, chunk_size=2, gene_name_id_dictionary=name_map,
                               cache_dir=tmp_path / "two", nproc=2)
    assert two.to_dict() == one.to_dict()
    assert two_stats == one_stats and two_stats.gene_name_mapping is not None
    reads = [line.split() for line in readers.read_text().splitlines()]
    assert sorted(int(start) for _, start in reads) == list(range(0, 45, 2))  # every chunk read once
    assert str(os.getpid()) not in {pid for pid, _ in reads}
    assert [p.name for p in (tmp_path / "two").iterdir()] == [Path(two.cache_files[0]["filename"]).name]
    import anndata

    backed = anndata.read_h5ad(path, backed="r")  # an AnnData opened by the caller: workers open its file
    readers.unlink()
    three, _ = _tokenize(backed, tokens, medians, chunk_size=2, gene_name_id_dictionary=name_map, nproc=2)
    assert three.to_dict() == one.to_dict()
    assert str(os.getpid()) not in {line.split()[0] for line in readers.read_text().splitlines()}
    assert backed.file.is_open, "the caller's file stays open"

    bad = adata.copy()
    bad.X[44, 3] = 0.5
    bad.write_h5ad(tmp_path / "bad.h5ad")
    with pytest.raises(DataError, match="holds value 0.5 for cell 'cell44'"):
        _tokenize(str(tmp_path / "bad.h5ad"), tokens, medians, chunk_size=2, cache_dir=tmp_path / "bad", nproc=3)
    assert [p.name for p in (tmp_path / "bad").iterdir() if p.name.startswith("shard-")] == []


def test_spawned_workers_write_what_one_writes(tmp_path, monkeypatch):
    """Where fork is missing, the job is pickled to spawned workers, which open the file themselves."""
    import multiprocessing

    from geneformer_peft.data import cell_source, rank_value

    adata = make_adata(20, 15, seed=9)
    path = tmp_path / "cells.h5ad"
    adata.write_h5ad(path)
    tokens, medians = make_vocab(list(adata.var_names), seed=9)
    one, _ = _tokenize(str(path), tokens, medians, chunk_size=6, label_column="cell_type")
    monkeypatch.setattr(rank_value, "_worker_context", lambda: multiprocessing.get_context("spawn"))

    def parent_read_rows(self, start, stop):
        raise AssertionError("the parent read counts")

    # spawned workers import the module afresh, without this patch
    monkeypatch.setattr(cell_source.CellSource, "read_rows", parent_read_rows)
    two, _ = _tokenize(str(path), tokens, medians, chunk_size=6, label_column="cell_type", nproc=2)
    assert two.to_dict() == one.to_dict()


def _killed_worker(index, starts):
    import os

    os._exit(9)  # as the OOM killer ends a process: no exception, no cleanup


def test_a_killed_worker_is_one_clear_error_exit_2(tmp_path, caplog, monkeypatch):
    import geneformer_peft.data.rank_value as rank_value

    adata = make_adata(30, 25, seed=6)
    adata.write_h5ad(tmp_path / "cells.h5ad")
    tokens, medians = make_vocab(list(adata.var_names), seed=6)
    (tmp_path / "tokens.pkl").write_bytes(pickle.dumps(tokens))
    (tmp_path / "medians.pkl").write_bytes(pickle.dumps(medians))
    monkeypatch.setattr(rank_value, "_tokenize_segment", _killed_worker)
    assert main(["tokenize", "--input", str(tmp_path / "cells.h5ad"), "--token_dictionary", str(tmp_path / "tokens.pkl"),
                 "--gene_median_dictionary", str(tmp_path / "medians.pkl"), "--chunk_size", "8", "--nproc", "2",
                 "--output", str(tmp_path / "out.dataset"), "--no_progress"]) == 2
    assert "a tokenization worker process died" in caplog.text and "--nproc" in caplog.text
    assert "Traceback" not in caplog.text and not (tmp_path / "out.dataset").exists()
