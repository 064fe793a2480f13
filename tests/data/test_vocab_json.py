"""Token and gene median dictionaries as plain JSON (issue 22): read by every loader, written by
``tokenize --build_vocab`` beside the pickles, their values checked, told apart from a
``tokenizers`` tokenizer.json."""
from __future__ import annotations

import json
import pickle

import datasets
import pytest
from data_factories import gene_ids, make_adata, make_vocab

from geneformer_peft.analysis.loading import resolve_token_dictionary
from geneformer_peft.cli import build_parser, main
from geneformer_peft.data.vocab import (
    load_gene_median_dictionary,
    load_token_dictionary,
    save_tokenizer_json,
    write_dictionaries,
)
from geneformer_peft.errors import DataError

TOKENS = {"<pad>": 0, "<mask>": 1, **{g: 2 + i for i, g in enumerate(gene_ids(5))}}
MEDIANS = {g: 0.5 + i / 3 for i, g in enumerate(gene_ids(5))}


def write(path, text: str):
    path.write_text(text, encoding="utf-8")
    return path


def test_plain_json_dictionaries_load(tmp_path):
    tokens = load_token_dictionary(write(tmp_path / "my_tokens.json", json.dumps(TOKENS)))
    assert tokens == TOKENS and all(type(v) is int for v in tokens.values())
    medians = load_gene_median_dictionary(write(tmp_path / "my_medians.json", json.dumps(MEDIANS)))
    assert medians == MEDIANS and all(type(v) is float for v in medians.values())
    # a tokenizers tokenizer.json is still read as one
    assert load_token_dictionary(save_tokenizer_json(TOKENS, tmp_path / "tok")) == TOKENS


def test_folders_holding_only_the_json_forms(tmp_path):
    write(tmp_path / "token_dictionary.json", json.dumps(TOKENS))
    write(tmp_path / "gene_median_dictionary.json", json.dumps(MEDIANS))
    assert load_token_dictionary(tmp_path) == TOKENS
    assert load_gene_median_dictionary(tmp_path) == MEDIANS
    tokens, path = resolve_token_dictionary(None, tmp_path)  # embed / perturb look in model folders
    assert tokens == TOKENS and path == tmp_path / "token_dictionary.json"


def test_write_dictionaries_writes_json_beside_the_pickles(tmp_path):
    medians = {**MEDIANS, gene_ids(5)[0]: 1 / 3}  # a float that must round-trip exactly
    write_dictionaries(tmp_path, TOKENS, medians)
    assert json.loads((tmp_path / "token_dictionary.json").read_text()) == TOKENS
    assert load_token_dictionary(tmp_path / "token_dictionary.json") == TOKENS
    assert load_gene_median_dictionary(tmp_path / "gene_median_dictionary.json") == medians
    assert pickle.loads((tmp_path / "gene_median_dictionary.pkl").read_bytes()) == medians
    (tmp_path / "token_dictionary.pkl").unlink()
    (tmp_path / "gene_median_dictionary.pkl").unlink()
    with pytest.raises(DataError, match=r"token_dictionary\.json: file exists"):
        write_dictionaries(tmp_path, TOKENS, medians)
    write_dictionaries(tmp_path, TOKENS, medians, overwrite=True)


@pytest.mark.parametrize("value, shown", [
    ('"1.5"', "'1.5'"), ("NaN", "nan"), ("Infinity", "inf"), ("true", "True"), ("null", "None"), ("-2", "-2"),
    pytest.param("1" + "0" * 400, "1000", id="beyond-float"),
])
def test_a_bad_median_names_file_gene_and_value(tmp_path, value, shown):
    path = write(tmp_path / "medians.json", '{"ENSG01": 1.0, "ENSG02": %s}' % value)
    with pytest.raises(DataError, match="expected a finite number > 0") as info:
        load_gene_median_dictionary(path)
    message = str(info.value)
    assert str(path) in message and "'ENSG02'" in message and f"median {shown}" in message


def test_a_string_median_in_a_pickle_is_refused_too(tmp_path):
    path = tmp_path / "medians.pkl"
    path.write_bytes(pickle.dumps({"ENSG01": "1.5"}))  # was converted with float() before
    with pytest.raises(DataError, match=r"medians\.pkl: gene 'ENSG01' has median '1\.5'"):
        load_gene_median_dictionary(path)


@pytest.mark.parametrize("text, expected", [
    ('{"<pad>": 0, "A": 1, "A": 2}', r"keys \['A'\] appear twice"),
    ('{"<pad>": 0, "A": true}', r"token 'A' has id True; expected an integer"),
    ('{"<pad>": 0, "A": "1"}', r"token 'A' has id '1'; expected a non-negative integer"),
    ('{"<pad>": 0, "A": 1.5}', r"token 'A' has id 1\.5"),
    ('{"<pad>": 0, "A": 0}', r"token ids \[0\] are used twice"),
    ('["<pad>", "A"]', r"token dictionary is a list; expected a dict"),
    ('{"<pad>": 0,', r"not valid JSON \(.* at line 1, column 13\)"),
])
def test_a_bad_token_dictionary_is_refused_naming_the_file(tmp_path, text, expected):
    path = write(tmp_path / "tokens.json", text)
    with pytest.raises(DataError, match=expected) as info:
        load_token_dictionary(path)
    assert str(path) in str(info.value)


def test_a_median_dictionary_with_a_repeated_gene_is_refused(tmp_path):
    path = write(tmp_path / "medians.json", '{"ENSG01": 1.0, "ENSG01": 2.0}')
    with pytest.raises(DataError, match=r"medians\.json: keys \['ENSG01'\] appear twice"):
        load_gene_median_dictionary(path)


def test_tokenize_builds_json_dictionaries_and_reads_them(tmp_path):
    adata = make_adata(30, 20, seed=3)
    adata.write_h5ad(tmp_path / "cells.h5ad")
    common = ["--input", str(tmp_path / "cells.h5ad"), "--model_input_size", "12", "--no_progress"]
    assert main(["tokenize", *common, "--output", str(tmp_path / "built.dataset"),
                 "--build_vocab", str(tmp_path / "vocab")]) == 0
    vocab = tmp_path / "vocab"
    assert {"token_dictionary.json", "gene_median_dictionary.json"} <= {p.name for p in vocab.iterdir()}
    assert load_token_dictionary(vocab / "token_dictionary.json") == load_token_dictionary(
        vocab / "token_dictionary.pkl")
    assert main(["tokenize", *common, "--output", str(tmp_path / "json.dataset"),
                 "--token_dictionary", str(vocab / "token_dictionary.json"),
                 "--gene_median_dictionary", str(vocab / "gene_median_dictionary.json")]) == 0
    built = datasets.load_from_disk(str(tmp_path / "built.dataset"))
    again = datasets.load_from_disk(str(tmp_path / "json.dataset"))
    assert built["input_ids"] == again["input_ids"]


def test_tokenize_with_a_bad_json_median_exits_2_naming_it(tmp_path, caplog):
    adata = make_adata(10, 8, seed=3)
    adata.write_h5ad(tmp_path / "cells.h5ad")
    tokens, medians = make_vocab(list(adata.var_names), seed=3)
    write(tmp_path / "tokens.json", json.dumps({k: int(v) for k, v in tokens.items()}))
    gene = list(medians)[2]
    medians = {k: float(v) for k, v in medians.items()}
    medians[gene] = "high"
    write(tmp_path / "medians.json", json.dumps(medians))
    assert main(["tokenize", "--input", str(tmp_path / "cells.h5ad"), "--output", str(tmp_path / "o.dataset"),
                 "--token_dictionary", str(tmp_path / "tokens.json"),
                 "--gene_median_dictionary", str(tmp_path / "medians.json"), "--no_progress"]) == 2
    assert f"gene {gene!r} has median 'high'" in caplog.text and "medians.json" in caplog.text


def test_every_dictionary_flag_names_the_json_form():
    parser = build_parser()
    flags = []
    for name, sub in parser._subparsers._group_actions[0].choices.items():
        for action in sub._actions:
            if any("dictionary" in option and "gene_name" not in option for option in action.option_strings):
                flags.append(f"{name} {action.option_strings[0]}")
                shown = ".json" in action.help and ("{token: id}" in action.help or ": median}" in action.help)
                assert shown, f"{name} {action.option_strings[0]}: {action.help}"
    assert "tokenize --gene_median_dictionary" in flags and "embed --token_dictionary" in flags
