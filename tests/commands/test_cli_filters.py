"""``perturb --filter`` and ``tokenize --obs_filter`` select labels holding a comma (the value
in double quotes, as in a CSV line); the old ``COLUMN=VALUE[,VALUE]`` syntax reads as before."""
from __future__ import annotations

import json

import pandas as pd
import pytest

from geneformer_peft.analysis.cells import parse_filters
from geneformer_peft.analysis.runs import select_rows
from geneformer_peft.commands.tokenize import parse_obs_filters
from geneformer_peft.data.filters import format_column_values, parse_column_values
from geneformer_peft.errors import DataError

COMMA_LABEL = "CD4+, naive T cell"


def _cells():
    import datasets

    labels = [COMMA_LABEL, "B cell", "naive T cell", COMMA_LABEL, "CD4+", "B cell"]
    return datasets.Dataset.from_dict({"input_ids": [[4, 5]] * len(labels), "cell_type": labels})


@pytest.mark.parametrize("text, values", [
    (f'cell_type="{COMMA_LABEL}"', {COMMA_LABEL}),
    (f'cell_type="{COMMA_LABEL}",B cell', {COMMA_LABEL, "B cell"}),
    (f'cell_type=B cell, "{COMMA_LABEL}"', {COMMA_LABEL, "B cell"}),
    ('cell_type="say ""hi""", there', {'say "hi"', "there"}),
])
def test_a_quoted_value_keeps_its_comma(text, values):
    assert parse_filters([text]) == [("cell_type", values)]


def test_the_old_syntax_reads_as_before():
    assert parse_filters(["cell_type=T cell,B cell", "batch = b1"]) == [("cell_type", {"T cell", "B cell"}),
                                                                         ("batch", {"b1"})]
    assert parse_obs_filters(["demuxlet_cls=SNG", "cell_type=A,,B"]) == {"demuxlet_cls": ["SNG"],
                                                                         "cell_type": ["A", "B"]}


def test_perturb_selects_cells_whose_label_holds_a_comma():
    rows = select_rows(_cells(), filters=[f'cell_type="{COMMA_LABEL}"'])
    assert rows.tolist() == [0, 3]
    rows = select_rows(_cells(), filters=[f'cell_type="{COMMA_LABEL}",B cell'])
    assert rows.tolist() == [0, 1, 3, 5]


def test_tokenize_obs_filter_takes_a_quoted_value():
    assert parse_obs_filters([f'cell_type="{COMMA_LABEL}",B']) == {"cell_type": [COMMA_LABEL, "B"]}


@pytest.mark.parametrize("values", [[COMMA_LABEL], ["B cell"], ['a "quoted" one', "x,y", "plain"]])
def test_format_reads_back(values):
    text = format_column_values("cell_type", values)
    assert parse_column_values(text, flag="--filter") == ("cell_type", values)
    if values == ["B cell"]:
        assert text == "cell_type=B cell", "a plain value is written as before (recorded in perturb provenance)"


@pytest.mark.parametrize("text, message", [("cell_type", "is not COLUMN=VALUE"), ("=A", "is not COLUMN=VALUE"),
                                           ('cell_type="A, b', "expected values separated by commas")])
def test_bad_filters_name_the_flag(text, message):
    with pytest.raises(DataError, match=message) as caught:
        parse_filters([text])
    assert str(caught.value).startswith(f"--filter {text!r}")


def test_perturb_command_with_a_comma_label(tmp_path, capsys):
    """End to end: a start state holding a comma (--cell_states_to_model) and a --filter."""
    pytest.importorskip("transformers", reason="the tiny analysis checkpoint is built with transformers")
    from analysis_factories import hf_checkpoint, make_cells, save_cells

    from geneformer_peft.cli import main

    hf_checkpoint(tmp_path / "ckpt")
    cells = make_cells(6, v2=True, seed=7, min_genes=6, max_genes=10, always=(20,))
    cells = cells.map(lambda row: {"cell_type": COMMA_LABEL if row["cell_type"] == "A" else row["cell_type"]})
    save_cells(cells, tmp_path / "cells.dataset")
    expected = [i for i, label in enumerate(cells["cell_type"]) if label == COMMA_LABEL]
    states = json.dumps({"state_key": "cell_type", "start_state": COMMA_LABEL, "goal_state": "B"})
    for name, extra in (("filter", ["--filter", f'cell_type="{COMMA_LABEL}"']),
                        ("states", ["--cell_states_to_model", states])):
        out = tmp_path / name
        code = main(["perturb", "--model_path", str(tmp_path / "ckpt"), "--input", str(tmp_path / "cells.dataset"),
                     "--output_dir", str(out), "--perturb_type", "delete", "--genes", "all", "--n_null", "2",
                     "--device", "cpu", "--no_plots", "--min_cells", "1", *extra])
        assert code == 0, name
        results = pd.read_parquet(out / "perturbations.parquet")
        assert sorted(set(results["cell"])) == expected and expected, name
