"""The perturbations on the rank value encoding, against their written definitions."""
from __future__ import annotations

import numpy as np
import pytest

from geneformer_peft.analysis.perturbation import perturb_genes, perturbed_length, rank_steps

GENES = np.array([10, 11, 12, 13, 14, 15, 16, 17])  # rank 0 .. 7


def _check_source(genes, new, source):
    inserted = source < 0
    np.testing.assert_array_equal(new[~inserted], genes[source[~inserted]])


def test_delete_removes_the_token():
    new, source = perturb_genes(GENES, np.array([13]), "delete")
    assert new.tolist() == [10, 11, 12, 14, 15, 16, 17]
    _check_source(GENES, new, source)
    new, _ = perturb_genes(GENES, np.array([17, 10, 99]), "delete")  # a combination; 99 not expressed
    assert new.tolist() == [11, 12, 13, 14, 15, 16]


def test_overexpress_moves_to_the_first_gene_position():
    new, source = perturb_genes(GENES, np.array([15]), "overexpress")
    assert new.tolist() == [15, 10, 11, 12, 13, 14, 16, 17]
    assert source.tolist() == [5, 0, 1, 2, 3, 4, 6, 7]
    new, source = perturb_genes(GENES, np.array([16, 12]), "overexpress")  # listed order at the front
    assert new.tolist() == [16, 12, 10, 11, 13, 14, 15, 17]


def test_overexpress_of_an_absent_gene_inserts_it_and_truncates():
    new, source = perturb_genes(GENES, np.array([99]), "overexpress", max_genes=8)
    assert new.tolist() == [99, 10, 11, 12, 13, 14, 15, 16]  # the lowest-ranked gene drops out
    assert source.tolist() == [-1, 0, 1, 2, 3, 4, 5, 6]
    new, _ = perturb_genes(GENES, np.array([99]), "overexpress", max_genes=20)
    assert len(new) == 9


@pytest.mark.parametrize("shift,steps", [(0.25, 2), (0.01, 1), (0.5, 4)])
def test_rank_steps(shift, steps):
    assert rank_steps(8, shift) == steps


def test_inhibit_and_activate_move_by_the_rank_shift():
    new, source = perturb_genes(GENES, np.array([12]), "inhibit", rank_shift=0.25)  # rank 2 -> 4
    assert new.tolist() == [10, 11, 13, 14, 12, 15, 16, 17]
    _check_source(GENES, new, source)
    new, _ = perturb_genes(GENES, np.array([15]), "activate", rank_shift=0.25)  # rank 5 -> 3
    assert new.tolist() == [10, 11, 12, 15, 13, 14, 16, 17]
    new, _ = perturb_genes(GENES, np.array([16]), "inhibit", rank_shift=0.25)  # clamped at the end
    assert new.tolist() == [10, 11, 12, 13, 14, 15, 17, 16]
    new, _ = perturb_genes(GENES, np.array([11]), "activate", rank_shift=0.5)  # clamped at the start
    assert new.tolist() == [11, 10, 12, 13, 14, 15, 16, 17]


def test_combined_moves_use_the_original_ranks():
    # 10 (rank 0) and 11 (rank 1) inhibited by 2: to after ranks 2 and 3, in their original order
    new, _ = perturb_genes(GENES, np.array([11, 10]), "inhibit", rank_shift=0.25)
    assert new.tolist() == [12, 10, 13, 11, 14, 15, 16, 17]
    new, _ = perturb_genes(GENES, np.array([99, 17]), "activate", rank_shift=0.25)  # 99 absent: skipped
    assert new.tolist() == [10, 11, 12, 13, 14, 17, 15, 16]


@pytest.mark.parametrize("kind", ["delete", "overexpress", "inhibit", "activate"])
def test_perturbed_length_predicts_the_length(kind):
    rng = np.random.default_rng(0)
    for _ in range(20):
        n = int(rng.integers(3, 12))
        genes = rng.permutation(50)[:n] + 4
        targets = rng.choice(60, size=int(rng.integers(1, 4)), replace=False) + 4
        present = int(np.isin(targets, genes).sum())
        new, _ = perturb_genes(genes, targets, kind, max_genes=10)
        assert len(new) == perturbed_length(n, present, len(targets), kind, max_genes=10)
        assert len(set(new.tolist())) == len(new)  # no gene twice
