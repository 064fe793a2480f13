"""Dictionaries are read without running code from the file (issue 22)."""
import os
import pickle
from pathlib import Path

import numpy as np
import pytest

from geneformer_peft.data.safe_pickle import load_plain_pickle
from geneformer_peft.data.vocab import load_gene_median_dictionary, load_token_dictionary
from geneformer_peft.errors import DataError

SHARED = Path(__file__).resolve().parents[3] / "shared" / "data"


class _Planted:
    """Unpickling this calls a function of the attacker's choice (here: create a marker file)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


@pytest.mark.parametrize("loader", [load_token_dictionary, load_gene_median_dictionary, load_plain_pickle])
def test_planted_pickle_runs_nothing(tmp_path, loader):
    marker = tmp_path / "ran"
    planted = tmp_path / "token_dictionary.pkl"
    planted.write_bytes(pickle.dumps({"<pad>": 0, "ENSG1": _Planted(marker)}))
    pickle.loads(planted.read_bytes())  # the plain unpickler runs it: the test can fail
    assert marker.exists()
    marker.unlink()
    with pytest.raises(DataError, match=r"token_dictionary\.pkl.*pathlib.*Path\.touch|token_dictionary\.pkl.*Path"):
        loader(planted)
    assert not marker.exists()


def test_numpy_scalars_and_plain_values_load(tmp_path):
    path = tmp_path / "d.pkl"
    path.write_bytes(pickle.dumps({"<pad>": np.int16(0), "<mask>": 1, "ENSG2": np.int64(2)}))
    assert load_token_dictionary(path) == {"<pad>": 0, "<mask>": 1, "ENSG2": 2}
    path.write_bytes(pickle.dumps({"ENSG2": np.float64(1.5), "ENSG3": 2.0}))
    assert load_gene_median_dictionary(path) == {"ENSG2": 1.5, "ENSG3": 2.0}


@pytest.mark.parametrize("payload, expected", [
    (pickle.dumps([1, 2]), "holds a list; expected a dict"),
    (pickle.dumps({"a": [1]}), "entry 'a' holds a list"),
    (b"not a pickle at all", "not a readable pickle"),
    (pickle.dumps({"a": 1})[:-3], "not a readable pickle"),
])
def test_non_dictionaries_refused_naming_the_file(tmp_path, payload, expected):
    path = tmp_path / "bad.pkl"
    path.write_bytes(payload)
    with pytest.raises(DataError, match=expected) as info:
        load_plain_pickle(path)
    assert str(path) in str(info.value)


@pytest.mark.skipif(not (SHARED / "geneformer_v1_token_dictionary.pkl").is_file(), reason="shared/data absent")
def test_geneformer_dictionaries_load():
    tokens = load_token_dictionary(SHARED / "geneformer_v1_token_dictionary.pkl")
    assert tokens["<pad>"] == 0 and tokens["<mask>"] == 1 and len(tokens) == 25426
    with open(SHARED / "geneformer_v1_token_dictionary.pkl", "rb") as handle:
        reference = {str(k): int(v) for k, v in pickle.load(handle).items()}
    assert tokens == reference
    medians = load_gene_median_dictionary(SHARED / "geneformer_v1_gene_median_dictionary.pkl")
    assert len(medians) == 25424 and all(value > 0 for value in medians.values())


@pytest.mark.parametrize("flag", ["--token_dictionary", "--gene_median_dictionary"])
def test_tokenize_with_a_planted_dictionary_runs_nothing_and_exits_2(flag, tmp_path, caplog):
    """The command line as the issue tried it: a crafted dictionary ran code and tokenize exited 0."""
    from data_factories import make_adata, make_vocab

    from geneformer_peft.cli import main

    adata = make_adata(8, 6, seed=1)
    adata.write_h5ad(tmp_path / "cells.h5ad")
    tokens, medians = make_vocab(list(adata.var_names), seed=1)
    marker = tmp_path / "ran"
    planted = {"--token_dictionary": {**tokens, "<extra>": _Planted(marker)},
               "--gene_median_dictionary": {**medians, "ENSGX": _Planted(marker)}}[flag]
    paths = {"--token_dictionary": tmp_path / "tokens.pkl", "--gene_median_dictionary": tmp_path / "medians.pkl"}
    paths["--token_dictionary"].write_bytes(pickle.dumps(tokens))
    paths["--gene_median_dictionary"].write_bytes(pickle.dumps(medians))
    paths[flag].write_bytes(pickle.dumps(planted))
    status = main(["tokenize", "--input", str(tmp_path / "cells.h5ad"), "--output", str(tmp_path / "out.dataset"),
                   "--token_dictionary", str(paths["--token_dictionary"]), "--gene_median_dictionary",
                   str(paths["--gene_median_dictionary"]), "--no_progress"])
    assert status == 2 and not marker.exists() and not (tmp_path / "out.dataset").exists()
    assert str(paths[flag]) in caplog.text
