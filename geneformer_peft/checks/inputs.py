"""``geneformer-peft check``: the compatibility report of a model and an input of any kind the
project reads (a saved dataset, a fold layout, or raw counts in a ``.h5ad``/``.loom`` tokenized
in memory with the model's own dictionaries), as the commands that train or analyse would see it."""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from geneformer_peft.checks import check_compatibility
from geneformer_peft.checks.report import CompatibilityReport
from geneformer_peft.errors import DataError

logger = logging.getLogger(__name__)

__all__ = ["check_input", "input_kind"]

RAW_SUFFIXES = (".h5ad", ".loom")
#: the input size raw counts are tokenized with: no cell is cut at tokenization
UNTRUNCATED = 2**31 - 1


def _has_folds(path: Path) -> bool:
    """Whether ``path`` is ``<data_path>/<dataset_name>`` of the reference fold layout (numbered
    folders holding ``<dataset_name>_train<i>.dataset``), with or without ``split_info.json``."""
    return any((child / f"{path.name}_train{child.name}.dataset").is_dir() for child in path.iterdir()
               if child.is_dir() and child.name.isdigit())


def input_kind(path: str | Path) -> str:
    """``"dataset"``, ``"folds"`` (a ``<data_path>/<dataset_name>`` folder written by ``split``) or ``"raw"``."""
    path = Path(path)
    if path.is_file() and path.suffix.lower() in RAW_SUFFIXES:
        return "raw"
    if path.is_dir() and (path / "dataset_info.json").is_file():
        return "dataset"
    if path.is_dir() and ((path / "split_info.json").is_file() or _has_folds(path)):
        return "folds"
    if not path.exists():
        raise DataError(f"--input {path} does not exist; expected a saved dataset, a fold layout folder "
                        "(<data_path>/<dataset_name> with split_info.json) or a .h5ad/.loom file")
    raise DataError(f"--input {path} is {'a folder' if path.is_dir() else 'a file'} of no kind check reads; expected "
                    "a saved dataset (dataset_info.json), a fold layout folder (split_info.json) or a .h5ad/.loom file")


def _tokenize_raw(model_path: Path, path: Path, *, token_dictionary, gene_median_dictionary, gene_id_column,
                  label_column, gene_name_id_dictionary=None):
    """Tokenize raw counts in memory as the model needs them (its family's encoding)."""
    from geneformer_peft.models.families import family_of

    family = family_of(model_path)
    if family.encoding == "binned":
        from geneformer_peft.data.binned import tokenize_binned

        panel = model_path / "gene_panel.txt"
        if not panel.is_file():
            raise DataError(f"{model_path}: no gene_panel.txt; the scBERT model's gene panel is needed to tokenize "
                            f"{path}")
        return tokenize_binned(path, gene_panel=panel, gene_id_column=gene_id_column, label_column=label_column,
                               show_progress=False)
    if family.encoding == "cellfm":
        from geneformer_peft.data.cellfm import tokenize_cellfm

        if gene_median_dictionary is not None:  # (the wording the rank value options share)
            raise DataError(f"--gene_median_dictionary apply to the rank value encoding; {model_path} is a CellFM "
                            "model, whose cells are tokenized with its tokenizer.json (or --token_dictionary)")
        vocabulary = token_dictionary or model_path
        return tokenize_cellfm(path, token_dictionary=vocabulary, gene_id_column=gene_id_column,
                               label_column=label_column, max_genes=UNTRUNCATED, show_progress=False,
                               gene_name_id_dictionary=gene_name_id_dictionary)
    from geneformer_peft.data.rank_value import tokenize_anndata

    tokens = token_dictionary or next((model_path / n for n in ("tokenizer.json", "token_dictionary.pkl")
                                       if (model_path / n).is_file()), None)
    medians = gene_median_dictionary or (model_path / "gene_median_dictionary.pkl")
    if tokens is None or not Path(medians).is_file():
        raise DataError(f"to tokenize {path} for {model_path}, pass --token_dictionary and --gene_median_dictionary "
                        f"(the checkpoint folder holds {'no tokenizer.json' if tokens is None else 'no gene_median_dictionary.pkl'})")
    extra: dict[str, Any] = {}
    if gene_name_id_dictionary is not None:
        extra["gene_name_id_dictionary"] = gene_name_id_dictionary
    # every expressed gene is kept, so that the truncation check measures what the model's input cuts
    return tokenize_anndata(path, token_dictionary=tokens, gene_median_dictionary=medians,
                            gene_id_column=gene_id_column, label_column=label_column,
                            model_input_size=UNTRUNCATED, show_progress=False, **extra)


def _check_gene_ids(model_path: Path, path: Path, *, token_dictionary, gene_id_column, mapped: bool
                    ) -> CompatibilityReport:
    """The ``gene_ids`` finding of raw counts: Ensembl ids or symbols, against the vocabulary's kind."""
    from geneformer_peft.checks.report import OK, REFUSED
    from geneformer_peft.data.cell_source import open_cell_source
    from geneformer_peft.data.gene_ids import check_gene_id_kinds, classify_gene_ids
    from geneformer_peft.data.vocab import load_token_dictionary
    from geneformer_peft.models.families import family_of

    family = family_of(model_path)
    report = CompatibilityReport(model_path=str(model_path), data=str(path), family=family.model_type[0])
    with open_cell_source(path, gene_id_column=gene_id_column) as cells:
        ids, field = cells.gene_ids, cells.gene_id_field
    kinds = classify_gene_ids(ids)
    details = {"field": field, "n_ids": kinds.n_total, "n_ensembl": kinds.n_ensembl,
               "symbol_fraction": kinds.symbol_fraction, "kind": kinds.kind, "mapped_with_dictionary": mapped}
    source = token_dictionary or next((model_path / n for n in ("tokenizer.json", "token_dictionary.pkl")
                                       if (model_path / n).is_file()), None)
    if family.encoding in ("rank_value", "cellfm") and source is not None and not mapped:
        try:
            check_gene_id_kinds(ids, load_token_dictionary(source), source_name=str(path), gene_id_field=field)
        except DataError as error:
            report.add("gene_ids", REFUSED, str(error), **details)
            return report
    report.add("gene_ids", OK, f"{kinds.n_total} gene ids in {field}: {kinds.n_ensembl} Ensembl ids, "
               f"{kinds.symbol_fraction:.1%} other ids" + (" (mapped with --gene_name_id_dictionary)" if mapped
                                                          else ""), **details)
    return report


def check_input(model_path: str | Path, input_path: str | Path, *, base_model=None, token_dictionary=None,
                gene_median_dictionary=None, gene_id_column: str | None = None,
                gene_name_id_dictionary=None, label_column: str | None = None, max_length: int | None = None,
                allow_low_gene_overlap: bool = False, allow_other_base: bool = False,
                output: str | Path | None = None) -> dict[str, CompatibilityReport]:
    """The compatibility report(s) of ``model_path`` with ``input_path``.

    Parameters
    ----------
    model_path
        A checkpoint or fine-tuned fold folder.
    input_path
        A saved dataset, a fold layout folder (``<data_path>/<dataset_name>``: one report per fold,
        over its train/val/test splits) or a ``.h5ad``/``.loom`` of raw counts (tokenized in memory
        with the checkpoint's dictionaries, or those given).
    base_model, token_dictionary, label_column, max_length, allow_low_gene_overlap, allow_other_base
        As for :func:`geneformer_peft.checks.check_compatibility`.
    gene_median_dictionary, gene_id_column, gene_name_id_dictionary
        Tokenizer options for raw counts.
    output
        Write the reports as JSON here (``{"input": ..., "kind": ..., "reports": {name: report}}``).

    Returns
    -------
    dict
        Name (``"input"`` or ``"fold <i>"``) -> :class:`CompatibilityReport`; nothing is raised
        for a refusal (the command exits 2 when any report refuses).
    """
    from geneformer_peft.data.dataset_io import load_saved_dataset

    model_path, input_path = Path(model_path), Path(input_path)
    kind = input_kind(input_path)
    common = dict(base_model=base_model, token_dictionary=token_dictionary, max_length=max_length,
                  allow_low_gene_overlap=allow_low_gene_overlap, allow_other_base=allow_other_base)
    reports: dict[str, CompatibilityReport] = {}
    if kind == "folds":
        from geneformer_peft.data.folds import SPLITS, discover_folds, fold_paths

        data_path, name = input_path.parent, input_path.name
        for fold in discover_folds(data_path, name):
            paths = fold_paths(data_path, name, fold)
            datasets = {f"{split} split {paths[split]}": load_saved_dataset(paths[split]) for split in SPLITS}
            reports[f"fold {fold}"] = check_compatibility(
                model_path, datasets, label_column=label_column or "cell_type",
                train_split=f"train split {paths['train']}", data_name=f"fold {fold} of {input_path}", **common)
    else:
        if kind == "raw":
            early = _check_gene_ids(model_path, input_path, token_dictionary=token_dictionary,
                                    gene_id_column=gene_id_column, mapped=gene_name_id_dictionary is not None)
            if not early.ok:  # symbols against an Ensembl vocabulary: tokenizing would only fail the same way
                reports["input"] = early
                dataset = None
            else:
                dataset = _tokenize_raw(model_path, input_path, token_dictionary=token_dictionary,
                                        gene_median_dictionary=gene_median_dictionary, gene_id_column=gene_id_column,
                                        label_column=label_column, gene_name_id_dictionary=gene_name_id_dictionary)
        else:
            dataset = load_saved_dataset(input_path)
        if dataset is not None:
            if label_column is not None and label_column not in dataset.column_names:
                raise DataError(f"--label_column {label_column!r}: {input_path} has no such column; expected one of "
                                f"{[c for c in dataset.column_names if c != 'input_ids']}")
            reports["input"] = check_compatibility(model_path, {str(input_path): dataset}, label_column=label_column,
                                                   train_split=None, **common)
            if kind == "raw":
                reports["input"].findings.insert(0, early.findings[0])
    if output is not None:
        from geneformer_peft.files import write_json

        write_json(output, {"input": str(input_path), "kind": kind, "model_path": str(model_path),
                            "compatible": all(r.ok for r in reports.values()),
                            "reports": {name: r.to_dict() for name, r in reports.items()}})
    return reports
