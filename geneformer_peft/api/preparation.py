"""``gp.tokenize`` and ``gp.split``: the ``tokenize`` and ``split`` commands for a notebook,
taking and returning objects (an AnnData in memory, a ``datasets.Dataset``) as well as paths."""
from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from geneformer_peft.api._session import prepare
from geneformer_peft.errors import DataError

logger = logging.getLogger(__name__)

__all__ = ["as_dataset", "split", "tokenize"]

PathLike = str | Path


def as_dataset(data: Any, *, what: str = "data"):
    """A ``datasets.Dataset`` from a Dataset (returned as is) or a saved dataset's folder.

    Raises
    ------
    DataError
        Anything else, naming what was given.
    """
    from geneformer_peft.data.dataset_io import load_saved_dataset

    if hasattr(data, "column_names") and hasattr(data, "select"):
        return data
    if isinstance(data, (str, Path)):
        return load_saved_dataset(data)
    raise DataError(f"{what} is a {type(data).__name__}; expected a datasets.Dataset or the folder of a saved one "
                    "(from gp.tokenize(..., output=...) or `geneformer-peft tokenize`)")


def tokenize(
    adata_or_path: Any,
    *,
    output: PathLike | None = None,
    token_dictionary: Any = None,
    gene_median_dictionary: Any = None,
    build_vocab: PathLike | None = None,
    gene_name_id_dictionary: Any = None,
    gene_id_column: str | None = None,
    label_column: str | None = None,
    keep_columns: Sequence[str] = (),
    model_input_size: int = 2048,
    model_version: str = "V1",
    chunk_size: int = 512,
    filter_column: str | None = "filter_pass",
    obs_filter: Mapping[str, Any] | None = None,
    overwrite: bool = False,
    progress: bool = True,
):
    """Tokenize raw counts with Geneformer's rank value encoding (``geneformer-peft tokenize``).

    Parameters
    ----------
    adata_or_path
        An in-memory ``anndata.AnnData`` of raw counts, or a ``.h5ad`` / ``.loom`` path.
    output
        Save the dataset here (``save_to_disk`` layout, written atomically); default: keep it in
        memory only.
    token_dictionary, gene_median_dictionary
        The vocabulary: dicts, JSON files, Geneformer's ``.pkl`` files or a ``tokenizer.json``.
        Give both, or ``build_vocab``.
    build_vocab
        Build both dictionaries from these counts and write them to this folder.
    gene_name_id_dictionary
        Gene symbol -> Ensembl id map (a dict or Geneformer's ``gene_name_id_dict.pkl``) for
        counts whose genes are named by symbol. Passed on only when given.
    gene_id_column
        ``var`` column of Ensembl ids (default: ``var["ensembl_id"]`` when present, else ``var_names``).
    label_column
        ``obs`` column copied as the label, e.g. ``"cell_type"``.
    keep_columns
        Further ``obs`` columns to copy.
    model_input_size
        Maximum tokens per cell, special tokens included (V1: 2048, V2: 4096).
    model_version
        ``"V1"`` or ``"V2"`` (``<cls>`` ... ``<eos>``).
    chunk_size
        Cells read at a time.
    filter_column
        ``obs`` column; when present only cells with value 1 are kept. ``None`` disables it.
    obs_filter
        ``{column: value or [values]}``: keep only matching cells.
    overwrite
        Replace an existing ``output`` (and dictionaries in ``build_vocab``).
    progress
        Show progress bars.

    Returns
    -------
    datasets.Dataset
        One row per kept cell: ``input_ids``, ``length``, the label and kept columns.

    Raises
    ------
    DataError
        As the command: an existing ``output`` without ``overwrite``, missing dictionaries, no
        gene in the vocabulary, counts that are not raw, ...
    """
    from geneformer_peft.data.rank_value import tokenize_anndata
    from geneformer_peft.data.vocab import tokenizer_dictionaries

    prepare()
    if output is not None:  # the command's guard: lock, output whole or absent, provenance
        from types import SimpleNamespace

        from geneformer_peft.commands._common import guarded
        from geneformer_peft.data.dataset_io import save_dataset_atomically

        paths = {name: value if isinstance(value, (str, Path)) else None for name, value in (
            ("input", adata_or_path), ("token_dictionary", token_dictionary),
            ("gene_median_dictionary", gene_median_dictionary), ("gene_name_id_dictionary", gene_name_id_dictionary))}
        options = SimpleNamespace(command="tokenize", **paths, output=Path(output), build_vocab=build_vocab,
                                  gene_id_column=gene_id_column, label_column=label_column,
                                  keep_columns=list(keep_columns),
                                  model_input_size=model_input_size, model_version=model_version,
                                  filter_column=filter_column, obs_filter=obs_filter, overwrite=overwrite)
        with guarded(options, "tokenize", inputs=tuple(paths), flag="output") as tmp:
            dataset = tokenize(adata_or_path, token_dictionary=token_dictionary,
                               gene_median_dictionary=gene_median_dictionary, gene_id_column=gene_id_column,
                               label_column=label_column, keep_columns=keep_columns,
                               model_input_size=model_input_size, model_version=model_version,
                               chunk_size=chunk_size, filter_column=filter_column, obs_filter=obs_filter,
                               build_vocab=build_vocab, overwrite=overwrite, progress=progress,
                               gene_name_id_dictionary=gene_name_id_dictionary)
            save_dataset_atomically(dataset, tmp)
        logger.info("saved %d cells to %s", len(dataset), output)
        return dataset
    tokens, medians = tokenizer_dictionaries(
        adata_or_path, token_dictionary=token_dictionary, gene_median_dictionary=gene_median_dictionary,
        build_vocab=build_vocab, overwrite=overwrite, gene_id_column=gene_id_column,
        gene_name_id_dictionary=gene_name_id_dictionary, model_version=model_version, chunk_size=chunk_size,
        filter_column=filter_column, obs_filter=obs_filter, show_progress=progress)
    dataset, stats = tokenize_anndata(
        adata_or_path, token_dictionary=tokens, gene_median_dictionary=medians, gene_id_column=gene_id_column,
        label_column=label_column, keep_columns=list(keep_columns), model_input_size=model_input_size,
        model_version=model_version, chunk_size=chunk_size, filter_column=filter_column, obs_filter=obs_filter,
        show_progress=progress, return_stats=True, gene_name_id_dictionary=gene_name_id_dictionary)
    return dataset


def split(
    dataset: Any,
    *,
    dataset_name: str,
    output_dir: PathLike,
    n_folds: int = 5,
    label_column: str = "cell_type",
    seed: int = 0,
    val_fraction: float = 0.1,
    overwrite: bool = False,
) -> Path:
    """Split tokenized cells into stratified cross-validation folds (``geneformer-peft split``).

    Parameters
    ----------
    dataset
        A ``datasets.Dataset`` (e.g. from :func:`tokenize`) or a saved dataset's folder.
    dataset_name
        Name used in the fold folders and file names.
    output_dir
        The ``data_path`` under which ``<dataset_name>/<i>/`` is written.
    n_folds
        Number of folds; the test sets partition the cells.
    label_column
        Label column to stratify on.
    seed
        Seed of the shuffles.
    val_fraction
        Fraction of each fold's non-test cells (per class) used for validation.
    overwrite
        Replace existing folds of this dataset name.

    Returns
    -------
    pathlib.Path
        ``<output_dir>/<dataset_name>``, the folder :func:`geneformer_peft.finetune` takes.
    """
    from types import SimpleNamespace

    from geneformer_peft.commands._common import guarded
    from geneformer_peft.data.folds import split_folds

    prepare()
    folder = Path(output_dir) / dataset_name
    # the command's guard: lock, whole folder or nothing, provenance, settings refused when changed
    options = SimpleNamespace(command="split", input=Path(dataset) if isinstance(dataset, (str, Path)) else None,
                              output=folder, dataset_name=dataset_name, n_folds=n_folds, label_column=label_column,
                              seed=seed, val_fraction=val_fraction, overwrite=overwrite)
    with guarded(options, "split", flag="output_dir/dataset_name") as tmp:
        split_folds(as_dataset(dataset, what="dataset"), dataset_name=dataset_name, output_dir=output_dir,
                    n_folds=n_folds, label_column=label_column, seed=seed, val_fraction=val_fraction,
                    overwrite=overwrite, into=tmp)
    logger.info("wrote %d folds under %s", n_folds, folder)
    return folder
