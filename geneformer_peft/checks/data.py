"""Checks of the data side against a model: its encoding, the genes the model has pretrained
rows for, the genes cut by the model's input size, token ids and labels.

All of them read the datasets' Arrow columns (memory-mapped) and never copy the tokens into
Python objects. Weights of a position: a cell's r-th gene (1-based) weighs ``1/sqrt(r)`` (its
"rank weight", as in the token baseline), so a share of rank weight tells how much of what the
rank value encoding says about a cell a cut or an unknown gene loses.
"""
from __future__ import annotations

import json
import math
from collections.abc import Mapping
from typing import Any

import numpy as np

from geneformer_peft.checks.report import OK, REFUSED, WARNING, CompatibilityReport

__all__ = ["MIN_GENE_OVERLAP", "TRUNCATION_WARNING_SHARE", "check_encoding", "check_labels", "check_recorded_vocabulary",
           "check_token_ids", "check_tokenized_with", "check_truncation", "check_vocabulary", "data_encoding",
           "dataset_stats", "token_id_problems"]

#: refuse when fewer than this share of the data's genes (or of its counts) have pretrained rows
MIN_GENE_OVERLAP = 0.5
#: warn when more than this share of cells is longer than the model's input
TRUNCATION_WARNING_SHARE = 0.10
#: cells whose tokens the share-of-weight figures read (the first ones; all of a smaller dataset)
MAX_CELLS_SCANNED = 50_000


def _column(dataset, name: str):
    import pyarrow as pa

    column = dataset.data.column(name)
    return column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column


def _lengths(dataset) -> np.ndarray:
    import pyarrow.compute as pc

    return pc.fill_null(pc.list_value_length(_column(dataset, "input_ids")), 0).to_numpy(zero_copy_only=False)


def dataset_stats(dataset) -> dict[str, Any]:
    """The tokenizer's summary stored in ``dataset.info.description`` (``{}`` when absent)."""
    try:
        stats = json.loads(dataset.info.description or "{}")
    except (ValueError, TypeError):
        return {}
    return stats if isinstance(stats, dict) else {}


def data_encoding(dataset) -> str | None:
    """``"rank_value"``, ``"binned"`` (or another encoding a tokenizer recorded), ``None`` when unknown."""
    stats = dataset_stats(dataset)
    if "encoding" in stats:
        return str(stats["encoding"])
    return "rank_value" if "model_version" in stats else None


def check_encoding(report: CompatibilityReport, datasets: Mapping[str, Any], expected: str) -> None:
    """Refuse data encoded for another model family (e.g. scBERT's binned values into Geneformer)."""
    found = {name: data_encoding(ds) for name, ds in datasets.items()}
    wrong = {name: enc for name, enc in found.items() if enc is not None and enc != expected}
    if wrong:
        name, enc = next(iter(wrong.items()))
        report.add("encoding", REFUSED, f"{name} is {enc}-encoded (its dataset_info.json says so) but the "
                   f"{report.family} model reads {expected}-encoded cells; tokenize the raw counts again for this "
                   "model (geneformer-peft tokenize with its options for this model family)",
                   expected=expected, found=found)
    elif all(enc is None for enc in found.values()):
        report.add("encoding", OK, f"encoding not recorded in the data (no tokenizer summary); assumed {expected}",
                   expected=expected, found=found)
    else:
        report.add("encoding", OK, f"{expected}, as the model reads", expected=expected, found=found)


def _rank_weights(n: int) -> np.ndarray:
    """Cumulative rank weight: ``out[k]`` = sum of ``1/sqrt(r)`` for r = 1..k."""
    return np.concatenate([[0.0], np.cumsum(1.0 / np.sqrt(np.arange(1, n + 1)))])


def check_tokenized_with(report: CompatibilityReport, datasets: Mapping[str, Any], dictionary: Mapping[str, int],
                         source: str) -> None:
    """Refuse data whose tokenizer recorded another token dictionary than the model's (token ids of
    one dictionary read as the genes of another); datasets that recorded none pass unchecked."""
    from geneformer_peft.data.vocab import dictionary_digest

    want = dictionary_digest(dictionary)
    recorded = {name: dataset_stats(ds).get("token_dictionary_sha256") for name, ds in datasets.items()}
    other = {name: sha for name, sha in recorded.items() if sha and sha != want}
    if other:
        name, sha = next(iter(other.items()))
        report.add("tokenized_with", REFUSED, f"{name} was tokenized with another token dictionary (SHA-256 "
                   f"{sha[:12]}...) than the model's {source} ({want[:12]}...): its token ids would be read as other "
                   "genes; tokenize the raw counts with the model's dictionary", expected=want, recorded=recorded)
    elif any(recorded.values()):
        report.add("tokenized_with", OK, f"tokenized with the model's dictionary ({source})", expected=want,
                   recorded=recorded)


def check_truncation(report: CompatibilityReport, datasets: Mapping[str, Any], max_length: int) -> None:
    """How many cells are longer than the model's input, how many genes and what share of their
    rank weight the cut drops; a warning above :data:`TRUNCATION_WARNING_SHARE` of cells."""
    lengths = np.concatenate([_lengths(ds) for ds in datasets.values()]) if datasets else np.zeros(0, int)
    cut = lengths > max_length
    details: dict[str, Any] = {"max_length": int(max_length), "n_cells": int(lengths.size), "n_cells_cut": int(cut.sum())}
    tokenized_cut = {name: dataset_stats(ds).get("n_cells_truncated") for name, ds in datasets.items()}
    tokenized_cut = {k: v for k, v in tokenized_cut.items() if v}
    if tokenized_cut:
        details["cut_at_tokenization"] = {name: {"n_cells": int(n), "input_size": dataset_stats(datasets[name]).get(
            "model_input_size")} for name, n in tokenized_cut.items()}
    share = float(cut.mean()) if lengths.size else 0.0
    if not cut.any():
        report.add("truncation", OK, f"every cell fits the model's {max_length} input tokens", **details)
        return
    dropped = lengths[cut] - max_length
    cumulative = _rank_weights(int(lengths.max()))
    weight_share = (cumulative[lengths[cut]] - cumulative[max_length]) / cumulative[lengths[cut]]
    details.update(share_cut=share, genes_dropped_median=float(np.median(dropped)), genes_dropped_max=int(dropped.max()),
                   rank_weight_dropped_median=float(np.median(weight_share)),
                   rank_weight_dropped_max=float(weight_share.max()))
    message = (f"{int(cut.sum())} of {lengths.size} cells ({share:.0%}) are longer than the model's {max_length} input "
               f"tokens: their genes beyond the first {max_length} are not read (dropped per cut cell: median "
               f"{np.median(dropped):.0f} genes, max {dropped.max()}; {np.median(weight_share):.1%} of the rank weight "
               f"median, {weight_share.max():.1%} max)")
    report.add("truncation", WARNING if share > TRUNCATION_WARNING_SHARE else OK, message, **details)


def check_vocabulary(report: CompatibilityReport, datasets: Mapping[str, Any], *, pretrained_ids: set[int] | None,
                     id_to_gene: Mapping[int, str] | None, special_ids: set[int], min_overlap: float = MIN_GENE_OVERLAP,
                     allow_low_overlap: bool = False) -> None:
    """The share of the data's genes (distinct gene tokens, and rank weight) that have pretrained
    rows in the model, and of the tokenized file's counts its dictionary matched; refuse below
    ``min_overlap`` unless ``allow_low_overlap``."""
    import pyarrow.compute as pc

    details: dict[str, Any] = {"min_overlap": min_overlap}
    problems = []
    # what tokenization lost: genes of the file without a token (their counts never reached the data)
    worst = None
    for name, ds in datasets.items():
        stats = dataset_stats(ds)
        if "matched_count_fraction" in stats and (worst is None or stats["matched_count_fraction"] < worst[1]):
            worst = (name, float(stats["matched_count_fraction"]), stats.get("n_genes_matched"),
                     stats.get("n_genes_total"))
    if worst is not None:
        details["tokenized"] = {"dataset": worst[0], "count_share_matched": worst[1], "n_genes_matched": worst[2],
                                "n_genes_total": worst[3]}
        if worst[1] < min_overlap:
            problems.append(f"when {worst[0]} was tokenized, the token dictionary matched {worst[2]} of its file's "
                            f"{worst[3]} genes, carrying {worst[1]:.1%} of the counts (below {min_overlap:.0%}): "
                            "the gene ids of the file are not those of the dictionary (symbols vs Ensembl ids? pass "
                            "--gene_name_id_dictionary to tokenize)")
    if pretrained_ids is not None:
        seen: set[int] = set()
        weight_total = weight_pretrained = 0.0
        pretrained_array = np.fromiter(pretrained_ids, dtype=np.int64) if pretrained_ids else np.zeros(0, np.int64)
        for ds in datasets.values():
            column = _column(ds, "input_ids")
            n = min(len(column), MAX_CELLS_SCANNED)
            column = column.slice(0, n)
            values = pc.list_flatten(column).to_numpy(zero_copy_only=False).astype(np.int64)
            offsets = column.offsets.to_numpy().astype(np.int64)
            offsets = offsets - offsets[0]
            rank = np.arange(values.size) - np.repeat(offsets[:-1], np.diff(offsets)) + 1
            gene = ~np.isin(values, list(special_ids))
            weights = 1.0 / np.sqrt(rank[gene])
            known = np.isin(values[gene], pretrained_array)
            weight_total += float(weights.sum())
            weight_pretrained += float(weights[known].sum())
            seen.update(np.unique(values[gene]).tolist())
        shared = seen & pretrained_ids
        new = sorted(seen - pretrained_ids)
        gene_share = len(shared) / len(seen) if seen else 0.0
        weight_share = weight_pretrained / weight_total if weight_total else 0.0
        names = [id_to_gene.get(i, str(i)) for i in new[:20]] if id_to_gene else [str(i) for i in new[:20]]
        details.update(n_data_genes=len(seen), n_pretrained=len(shared), gene_share_pretrained=gene_share,
                       rank_weight_share_pretrained=weight_share, n_new_genes=len(new), new_genes_examples=names)
        if not shared:
            problems.append(f"none of the data's {len(seen)} genes has a pretrained row in the model (e.g. "
                            f"{names[:5]} are new rows after a vocabulary remap, or the data was tokenized with "
                            "another dictionary): the model would learn from scratch")
        elif gene_share < min_overlap or weight_share < min_overlap:
            problems.append(f"only {len(shared)} of the data's {len(seen)} genes ({gene_share:.1%}; "
                            f"{weight_share:.1%} of the rank weight) have pretrained rows in the model (below "
                            f"{min_overlap:.0%}); genes the model has never seen, e.g. {names[:5]}")
    if problems and not allow_low_overlap:
        report.add("vocabulary", REFUSED, "; ".join(problems) + "; use a checkpoint pretrained on these genes, or "
                   "pass --allow_low_gene_overlap to go on anyway", **details)
    elif problems:
        report.add("vocabulary", WARNING, "; ".join(problems) + " (allowed by --allow_low_gene_overlap)", **details)
    elif pretrained_ids is None and worst is None:
        report.add("vocabulary", OK, "gene coverage unknown (no token dictionary names the genes and no tokenizer "
                   "summary is recorded)", **details)
    else:
        parts = []
        if "n_data_genes" in details:
            parts.append(f"{details['n_pretrained']} of the data's {details['n_data_genes']} genes "
                         f"({details['gene_share_pretrained']:.1%}, {details['rank_weight_share_pretrained']:.1%} of "
                         "the rank weight) have pretrained rows")
        if worst is not None:
            parts.append(f"tokenization matched {worst[1]:.1%} of the counts")
        report.add("vocabulary", OK, "; ".join(parts), **details)


def token_id_problems(dataset, where: str, *, vocab_size: int, max_length: int | None) -> list[str]:
    """Empty cells and token ids outside ``[0, vocab_size)`` (within the first ``max_length`` tokens)."""
    import pyarrow.compute as pc

    if "input_ids" not in dataset.column_names:
        return [(f"{where}: no 'input_ids' column; expected a tokenized dataset, found columns "
                 f"{dataset.column_names}")]
    column = _column(dataset, "input_ids")
    problems = []
    lengths = pc.fill_null(pc.list_value_length(column), 0).to_numpy(zero_copy_only=False)
    empty = np.flatnonzero(lengths == 0)
    if len(empty):
        problems.append(f"{where}: {len(empty)} cells have no gene token (empty input_ids, e.g. rows "
                        f"{empty[:5].tolist()}); filter them out before splitting")
    values = pc.list_flatten(column if max_length is None else pc.list_slice(column, 0, max_length))
    if len(values):
        low, high = (v.as_py() for v in pc.min_max(values).values())
        if low is not None and low < 0:
            problems.append(f"{where}: holds negative token id {low}; token ids must be in [0, {vocab_size - 1}]")
        if high is not None and high >= vocab_size:
            problems.append(f"{where}: holds token id {high}, but the model has vocab_size {vocab_size}; tokenize "
                            "with the checkpoint's own token dictionary (or remap the checkpoint to yours: "
                            "geneformer-peft remap-vocab)")
    return problems


def check_recorded_vocabulary(report: CompatibilityReport, datasets: Mapping[str, Any],
                              dictionary: Mapping[str, int] | None, source: str | None) -> None:
    """Cells that record the vocabulary they were tokenized with (``vocabulary_sha1``, CellFM's
    encoding) against the model's own (``dictionary`` from ``source``, its tokenizer.json):
    another vocabulary gives the same ids to other genes, so it is refused."""
    from geneformer_peft.data.cellfm import vocabulary_fingerprint

    recorded = {name: dataset_stats(ds).get("vocabulary_sha1") for name, ds in datasets.items()}
    recorded = {name: sha for name, sha in recorded.items() if sha}
    if dictionary is None or not recorded:
        why = "the model has no tokenizer.json" if dictionary is None else "the data does not record its vocabulary"
        report.add("vocabulary", OK, f"vocabulary not compared: {why}", recorded=recorded)
        return
    own = vocabulary_fingerprint(dictionary)
    other = {name: sha for name, sha in recorded.items() if sha != own}
    if other:
        name = next(iter(other))
        size = dataset_stats(datasets[name]).get("vocabulary_size")
        report.add("vocabulary", REFUSED, f"{name} was tokenized with another vocabulary ({size} tokens) than the "
                   f"model's {source} ({len(dictionary)} tokens): its ids name other genes' rows; tokenize with "
                   f"{source}, or put the checkpoint on your vocabulary first (geneformer-peft remap-vocab)",
                   model_sha1=own, recorded=recorded)
    else:
        report.add("vocabulary", OK, f"tokenized with the model's own vocabulary ({source})", model_sha1=own,
                   recorded=recorded)


def check_token_ids(report: CompatibilityReport, datasets: Mapping[str, Any], *, vocab_size: int,
                    max_length: int | None) -> None:
    problems = [p for name, ds in datasets.items()
                for p in token_id_problems(ds, name, vocab_size=vocab_size, max_length=max_length)]
    if problems:
        report.add("token_ids", REFUSED, "; ".join(problems), vocab_size=vocab_size)
    else:
        report.add("token_ids", OK, f"every token id is below vocab_size {vocab_size}", vocab_size=vocab_size)


def _is_missing(value: Any) -> bool:
    """None, NaN, an empty label, or "nan" (what a NaN becomes when a label column is made strings)."""
    return value is None or (isinstance(value, float) and math.isnan(value)) or (
        isinstance(value, str) and value.strip().lower() in ("", "nan"))


def check_labels(report: CompatibilityReport, datasets: Mapping[str, Any], label_column: str, *,
                 train: str | None = "train", min_cells: int = 3) -> None:
    """Labels up front: missing values refused, a single class refused, classes absent from
    ``train`` and classes with fewer than ``min_cells`` train cells named (warning)."""
    problems, notes = [], []
    counts: dict[str, dict[str, int]] = {}
    for name, ds in datasets.items():
        if label_column not in ds.column_names:
            problems.append(f"{name}: label column {label_column!r} does not exist; expected one of "
                            f"{ds.column_names} (set --label_column)")
            continue
        values = ds.data.column(label_column).to_pylist()
        missing = [i for i, v in enumerate(values) if _is_missing(v)]
        if missing:
            problems.append(f"{name}: label column {label_column!r} holds {len(missing)} missing labels (None, NaN, "
                            f"'nan' or empty, e.g. rows {missing[:5]}); expected a label per cell: drop or label "
                            "those cells")
        kinds = sorted({type(v).__name__ for v in values if not _is_missing(v)})
        if len(kinds) > 1:
            problems.append(f"{name}: label column {label_column!r} mixes value types {kinds}; expected one type "
                            "(e.g. all strings)")
        unique, n = np.unique([str(v) for v in values if not _is_missing(v)], return_counts=True)
        counts[name] = dict(zip(unique.tolist(), n.tolist()))
    all_kinds = {name: sorted({type(v).__name__ for v in ds.data.column(label_column).to_pylist()
                               if not _is_missing(v)}) for name, ds in datasets.items()
                 if label_column in ds.column_names}
    if not problems and len({k for names in all_kinds.values() for k in names}) > 1:
        problems.append(f"label column {label_column!r} holds values of different types across the datasets "
                        f"({'; '.join(f'{name}: {names}' for name, names in all_kinds.items())}); expected one type "
                        "(e.g. all strings)")
    if not problems:
        reference = counts.get(train) if train in counts else {k: v for c in counts.values() for k, v in c.items()}
        if len(reference) < 2 and train is not None:
            problems.append(f"{train or 'the data'} holds a single class {sorted(reference)} in {label_column!r}; "
                            "a classifier needs at least two classes")
        if train in counts:
            for name, c in counts.items():
                absent = sorted(set(c) - set(counts[train]))
                if name != train and absent:
                    notes.append(f"{name} has classes absent from {train} {absent} (the model cannot predict them)")
        rare = sorted(k for k, v in reference.items() if v < min_cells)
        if rare:
            notes.append(f"classes with fewer than {min_cells} cells in {train or 'the data'}: {rare}")
    if problems:
        report.add("labels", REFUSED, "; ".join(problems), column=label_column, counts=counts)
    elif notes:
        report.add("labels", WARNING, "; ".join(notes), column=label_column, counts=counts)
    else:
        report.add("labels", OK, f"{len(next(iter(counts.values()), {}))} classes in {label_column!r}",
                   column=label_column, counts=counts)
