"""The linear baseline: features and fit equal a direct scikit-learn computation, C is
chosen on validation with the test split read once, and the result is deterministic."""
from __future__ import annotations

import numpy as np
import pytest
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import f1_score

from geneformer_peft.data.cells import EncodedCells
from geneformer_peft.errors import DataError
from geneformer_peft.evaluation import baseline as bl

N_GENES = 30  # token ids 0..31: 0 <pad>, 1 <mask>, genes 2..31
VOCAB = N_GENES + 2


def _cells(seed: int, n: int, *, name: str, n_classes: int = 3, noise: float = 0.5) -> EncodedCells:
    """Cells whose top-ranked genes depend on the class (with noise), as flat token ids."""
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % n_classes
    rng.shuffle(labels)
    cells = []
    for label in labels:
        scores = rng.random(N_GENES) + noise * rng.random(N_GENES)
        scores[label * 5:(label + 1) * 5] += 0.6
        order = np.argsort(-scores)[: rng.integers(8, 20)] + 2
        cells.append(order.astype(np.int32))
    flat = np.concatenate(cells)
    offsets = np.concatenate([[0], np.cumsum([len(c) for c in cells])]).astype(np.int64)
    return EncodedCells(flat, offsets, labels=labels.astype(np.int64), name=name)


def _splits(seed: int = 0) -> dict[str, EncodedCells]:
    return {"train": _cells(seed, 60, name="train"), "val": _cells(seed + 1, 24, name="val"),
            "test": _cells(seed + 2, 30, name="test")}


def _dense_features(cells: EncodedCells, specials=(0, 1)) -> np.ndarray:
    out = np.zeros((len(cells), VOCAB))
    for i in range(len(cells)):
        rank = 0
        for token in cells.tokens(i):
            if int(token) in specials:
                continue
            rank += 1
            out[i, int(token)] += 1.0 / np.sqrt(rank)
    return out


def test_token_features_rank_weights_and_specials():
    flat = np.array([2, 0, 5, 3, 1, 4, 2, 7], dtype=np.int32)  # cell 0: 2 <pad> 5 3; cell 1: <mask> 4 2 7
    cells = EncodedCells(flat, np.array([0, 4, 8]), labels=np.array([0, 1]))
    X = bl.token_features(cells, 8, special_ids=(0, 1)).toarray()
    expected = np.zeros((2, 8))
    expected[0, [2, 5, 3]] = 1 / np.sqrt([1, 2, 3])
    expected[1, [4, 2, 7]] = 1 / np.sqrt([1, 2, 3])
    np.testing.assert_allclose(X, expected)
    np.testing.assert_allclose(bl.token_features(cells, 8, special_ids=()).toarray()[0, [2, 0, 5, 3]],
                               1 / np.sqrt([1, 2, 3, 4]))
    truncated = EncodedCells(flat, np.array([0, 4, 8]), labels=np.array([0, 1]), max_length=2)
    assert bl.token_features(truncated, 8).toarray()[0].nonzero()[0].tolist() == [2]  # the model's genes only
    with pytest.raises(DataError, match="token id 7"):
        bl.token_features(cells, 7)


def test_special_token_ids_from_dictionary():
    assert bl.special_token_ids({"<pad>": 0, "<mask>": 1, "<cls>": 2, "<eos>": 3, "ENSG1": 4}) == (0, 1, 2, 3)
    assert bl.special_token_ids(None) == (0, 1)


def test_fit_equals_direct_sklearn_with_c_chosen_on_validation():
    splits = _splits()
    grid = (0.01, 0.3, 3.0)
    weights = np.array([0.5, 0.7, 0.9])
    result = bl.fold_baseline(splits, label_names=["a", "b", "c"], n_features=VOCAB, class_weight=weights,
                              c_grid=grid, seed=3)
    X = {name: _dense_features(cells) for name, cells in splits.items()}
    y = {name: cells.labels for name, cells in splits.items()}
    val_f1, models = {}, {}
    for C in grid:
        model = LogisticRegression(C=C, class_weight={0: 0.5, 1: 0.7, 2: 0.9}, max_iter=bl.MAX_ITER,
                                   random_state=3).fit(X["train"], y["train"])
        models[C] = model
        val_f1[C] = f1_score(y["val"], model.predict(X["val"]), average="macro", labels=[0, 1, 2])
    assert result.val_scores == pytest.approx(val_f1)
    best = max(val_f1.values())
    assert result.C in [C for C in grid if val_f1[C] == best]
    direct = models[result.C]
    np.testing.assert_array_equal(result.predictions, direct.predict(X["test"]))
    np.testing.assert_allclose(result.probabilities, direct.predict_proba(X["test"]), atol=1e-6)
    assert result.metrics["macro_f1"] == pytest.approx(
        f1_score(y["test"], direct.predict(X["test"]), average="macro", labels=[0, 1, 2]))
    assert result.metrics["C"] == result.C and result.metrics["features"] == "tokens"


def test_test_split_is_read_once_after_c_is_chosen(monkeypatch):
    splits = _splits(seed=5)
    events = []
    real_features, real_make = bl.token_features, bl._make_classifier

    def spy_features(cells, n_features, **kw):
        events.append(("features", cells.name))
        return real_features(cells, n_features, **kw)

    class Spy:
        def __init__(self, C, *args):
            self.inner, self.C = real_make(C, *args), C

        def fit(self, X, y):
            events.append(("fit", self.C))
            self.inner.fit(X, y)
            self.classes_ = self.inner.classes_
            return self

        def predict_proba(self, X):
            events.append(("predict", X.shape[0]))
            return self.inner.predict_proba(X)

    monkeypatch.setattr(bl, "token_features", spy_features)
    monkeypatch.setattr(bl, "_make_classifier", Spy)
    result = bl.fold_baseline(splits, label_names=["a", "b", "c"], n_features=VOCAB, c_grid=(0.1, 1.0, 10.0))
    assert events.count(("features", "test")) == 1
    first_test = events.index(("features", "test"))
    assert [e for e in events[:first_test] if e[0] == "fit"] == [("fit", 0.1), ("fit", 1.0), ("fit", 10.0)]
    assert [e for e in events[first_test:] if e[0] == "fit"] == []  # nothing is fitted once test is read
    assert events[first_test:] == [("features", "test"), ("predict", len(splits["test"]))]
    assert all(e == ("predict", len(splits["val"])) for e in events[:first_test] if e[0] == "predict")
    # the test labels play no part in the choice
    flipped = dict(splits, test=EncodedCells(splits["test"].flat, splits["test"].offsets,
                                             labels=(splits["test"].labels + 1) % 3, name="test"))
    assert bl.fold_baseline(flipped, label_names=["a", "b", "c"], n_features=VOCAB,
                            c_grid=(0.1, 1.0, 10.0)).C == result.C


def test_deterministic_for_a_seed():
    a = bl.fold_baseline(_splits(), label_names=["a", "b", "c"], n_features=VOCAB, seed=1)
    b = bl.fold_baseline(_splits(), label_names=["a", "b", "c"], n_features=VOCAB, seed=1)
    np.testing.assert_array_equal(a.probabilities, b.probabilities)
    assert a.C == b.C and a.val_scores == b.val_scores


def test_class_absent_from_train_gets_zero_probability():
    splits = _splits()
    train = splits["train"]
    keep = np.flatnonzero(train.labels != 2)
    cells = [train.tokens(i) for i in keep]
    splits["train"] = EncodedCells(np.concatenate(cells), np.concatenate([[0], np.cumsum([len(c) for c in cells])]),
                                   labels=train.labels[keep], name="train")
    result = bl.fold_baseline(splits, label_names=["a", "b", "c"], n_features=VOCAB)
    assert result.probabilities.shape == (30, 3)
    assert (result.probabilities[:, 2] == 0).all()
    np.testing.assert_allclose(result.probabilities.sum(axis=1), 1.0)


def test_expression_features_are_log1p_cp10k():
    import datasets

    ds = datasets.Dataset.from_dict({"expression_ids": [[3, 5, 7], [5, 2]],
                                     "expression_values": [[1.0, 3.0, 6.0], [4.0, 4.0]],
                                     "n_counts": [20.0, 8.0]})
    X = bl.expression_features(ds).toarray()
    expected = np.zeros((2, 8))
    expected[0, [3, 5, 7]] = np.log1p(np.array([1, 3, 6]) / 20 * 1e4)
    expected[1, [5, 2]] = np.log1p(np.array([4, 4]) / 8 * 1e4)
    np.testing.assert_allclose(X, expected)
    no_total = datasets.Dataset.from_dict({"expression_ids": [[3, 5]], "expression_values": [[1.0, 3.0]]})
    np.testing.assert_allclose(bl.expression_features(no_total).toarray()[0, [3, 5]],
                               np.log1p(np.array([1, 3]) / 4 * 1e4))
    with pytest.raises(DataError, match="expression_ids"):
        bl.expression_features(datasets.Dataset.from_dict({"input_ids": [[2, 3]]}))
    bad = datasets.Dataset.from_dict({"expression_ids": [[3, 5]], "expression_values": [[1.0]]})
    with pytest.raises(DataError, match="row 0"):
        bl.expression_features(bad)


def test_expression_baseline_on_datasets():
    import datasets

    splits = _splits()
    dsets = {}
    for name, cells in splits.items():  # counts decreasing with rank: the same signal as the tokens
        ids = [cells.tokens(i).tolist() for i in range(len(cells))]
        dsets[name] = datasets.Dataset.from_dict({"expression_ids": ids,
                                                  "expression_values": [list(range(len(c), 0, -1)) for c in ids]})
    result = bl.fold_baseline(splits, label_names=["a", "b", "c"], features="expression", datasets=dsets)
    assert result.metrics["features"] == "expression" and result.metrics["macro_f1"] > 0.5
    with pytest.raises(ValueError, match="datasets"):
        bl.fold_baseline(splits, label_names=["a", "b", "c"], features="expression")
    with pytest.raises(ValueError, match="expected one of"):
        bl.fold_baseline(splits, label_names=["a", "b", "c"], features="genes")


def _binned_cells(seed: int, n: int, *, name: str, n_positions: int = 12) -> EncodedCells:
    """Fixed-length binned cells (token = expression bin 0..5 per panel position), whose
    class raises the bins of its own four positions."""
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % 3
    rng.shuffle(labels)
    tokens = rng.integers(0, 3, size=(n, n_positions))
    for i, label in enumerate(labels):
        tokens[i, label * 4:(label + 1) * 4] += rng.integers(0, 4, size=4)
    tokens = np.minimum(tokens, 5)
    tokens[:, -1] = 0  # scBERT's extra position
    offsets = np.arange(n + 1, dtype=np.int64) * n_positions
    return EncodedCells(tokens.ravel().astype(np.int32), offsets, labels=labels.astype(np.int64), name=name)


def test_binned_features_are_the_bins_per_position():
    cells = _binned_cells(0, 7, name="binned")
    X = bl.binned_features(cells, 12)
    np.testing.assert_array_equal(X.toarray(), cells.flat.reshape(7, 12).astype(np.float64))
    ragged = EncodedCells(np.zeros(5, dtype=np.int32), np.array([0, 3, 5]), labels=np.array([0, 1]), name="ragged")
    with pytest.raises(DataError, match="ragged: cell 1 has 2 binned tokens; expected 3"):
        bl.binned_features(ragged, 3)


def test_binned_baseline_equals_direct_sklearn_on_bins():
    splits = {"train": _binned_cells(1, 60, name="train"), "val": _binned_cells(2, 24, name="val"),
              "test": _binned_cells(3, 30, name="test")}
    grid = (0.1, 1.0)
    result = bl.fold_baseline(splits, label_names=["a", "b", "c"], encoding="binned", c_grid=grid, seed=0)
    X = {k: c.flat.reshape(len(c), 12).astype(np.float64) for k, c in splits.items()}
    direct = LogisticRegression(C=result.C, max_iter=bl.MAX_ITER, random_state=0).fit(X["train"],
                                                                                      splits["train"].labels)
    np.testing.assert_array_equal(result.predictions, direct.predict(X["test"]))
    assert result.metrics["macro_f1"] > 0.6  # the bins carry the class; a bag of bin values would not
    with pytest.raises(ValueError, match="baseline encoding 'counts'"):
        bl.fold_baseline(splits, label_names=["a", "b", "c"], encoding="counts")
