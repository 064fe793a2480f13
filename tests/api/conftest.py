"""Fixtures of the Python API and compat tests (tests/api/)."""
from __future__ import annotations

import pytest

from api_factories import make_adata


@pytest.fixture(scope="session")
def vocab(tmp_path_factory):
    """The job data's dictionaries on disk, as the command reads them."""
    from geneformer_peft.data.vocab import build_vocabulary, write_dictionaries

    tokens, medians = build_vocabulary(make_adata(), show_progress=False)
    return write_dictionaries(tmp_path_factory.mktemp("vocab"), tokens, medians)


