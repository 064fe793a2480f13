"""``gp.predict``, ``gp.embed``, ``gp.perturb`` and ``gp.check``: the commands of the same
names for a notebook. Each takes an AnnData of raw counts (tokenized with the model's own
dictionaries, every cell kept so results line up with ``adata.obs``), a ``datasets.Dataset``
or a saved dataset's folder, and writes its results into the AnnData when given one."""
from __future__ import annotations

import logging
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from geneformer_peft.api._session import prepare
from geneformer_peft.api.preparation import as_dataset
from geneformer_peft.errors import DataError

logger = logging.getLogger(__name__)

__all__ = ["check", "embed", "is_anndata", "perturb", "predict", "tokenize_for_model", "umap", "umap_or_explain"]

PathLike = str | Path
_TOKEN_FILES = ("tokenizer.json", "token_dictionary.pkl", "token_dictionary.json")
_MEDIAN_FILES = ("gene_median_dictionary.pkl", "gene_median_dictionary.json")


def is_anndata(data: Any) -> bool:
    """Whether ``data`` is an ``anndata.AnnData``."""
    try:
        import anndata
    except ImportError:  # pragma: no cover - a core dependency
        return False
    return isinstance(data, anndata.AnnData)


def _first_file(names: Sequence[str], *folders: PathLike | None) -> Path | None:
    for folder in folders:
        for name in names:
            if folder is not None and (Path(folder) / name).is_file():
                return Path(folder) / name
    return None


def _trained_from(model: PathLike) -> Path | None:
    """The checkpoint a fine-tuned fold was trained from (its provenance.json), when still there."""
    import json

    path = Path(model) / "provenance.json"
    try:
        recorded = json.loads(path.read_text(encoding="utf-8"))["settings"]["checkpoint"]["path"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return Path(recorded) if Path(recorded).is_dir() else None


def tokenize_for_model(adata: Any, model: PathLike, *, base_model: PathLike | None = None, token_dictionary=None,
                       gene_median_dictionary=None, gene_id_column: str | None = None,
                       gene_name_id_dictionary=None, progress: bool = True):
    """Tokenize an in-memory AnnData for ``model``: its own dictionaries (or ``base_model``'s, or
    those of the checkpoint a fold was trained from, or those given), its input size and version,
    every cell kept and every ``obs`` column copied.

    Raises
    ------
    DataError
        When no dictionaries are found (naming the folders searched), or a cell would be lost.
    """
    from geneformer_peft.api.preparation import tokenize
    from geneformer_peft.data.vocab import load_token_dictionary, read_json_dictionary
    from geneformer_peft.models.families import family_of
    from geneformer_peft.models.generation import model_version

    folders = (model, base_model, _trained_from(model))
    tokens = token_dictionary or _first_file(_TOKEN_FILES, *folders)
    medians = gene_median_dictionary or _first_file(_MEDIAN_FILES, *folders)
    if tokens is None or medians is None:
        searched = [str(p) for p in folders if p is not None]
        raise DataError(f"to tokenize the AnnData for {model}, pass token_dictionary= and gene_median_dictionary= "
                        f"({', '.join(searched)} hold{'s' if len(searched) == 1 else ''} no "
                        f"{'token dictionary' if tokens is None else 'gene median dictionary'})")
    folder = Path(model) if (Path(model) / "config.json").is_file() or base_model is None else Path(base_model)
    if family_of(folder).encoding != "rank_value":
        raise DataError(f"{folder} reads {family_of(folder).encoding} data; tokenize the AnnData with "
                        "`geneformer-peft tokenize --encoding binned` and pass the saved dataset")
    raw = read_json_dictionary(folder / "config.json", "config.json")
    vocabulary = tokens if isinstance(tokens, Mapping) else load_token_dictionary(tokens)
    version = model_version(SimpleNamespace(**raw), vocabulary)
    size = int(raw.get("max_position_embeddings", 2048))
    columns = [str(c) for c in adata.obs.columns]
    dataset = tokenize(adata, token_dictionary=tokens, gene_median_dictionary=medians, gene_id_column=gene_id_column,
                       gene_name_id_dictionary=gene_name_id_dictionary, keep_columns=columns,
                       model_input_size=size, model_version=version, filter_column=None,
                       progress=progress)
    if len(dataset) != adata.n_obs:  # cannot happen without filters; the results must line up with obs
        raise DataError(f"tokenized {len(dataset)} of the AnnData's {adata.n_obs} cells; expected every cell")
    return dataset


def _cells(data: Any, model, *, base_model=None, progress: bool = True, **tokenize_options):
    """``(dataset, adata or None)`` for any input the API takes."""
    if is_anndata(data):
        return tokenize_for_model(data, model, base_model=base_model, progress=progress, **tokenize_options), data
    given = {k: v for k, v in tokenize_options.items() if v is not None}
    if given:
        raise DataError(f"{sorted(given)} apply to an AnnData of raw counts; the input is already tokenized")
    return as_dataset(data, what="the input"), None


def _command_options(command: str, data: Any, model: PathLike, output: PathLike | None, tokenize_options: dict,
                     **options):
    """The options of the command an API call mirrors, as its guard records them: paths as the
    command's flags (an input in memory as ``None``), the tokenization of an AnnData besides."""
    from types import SimpleNamespace

    def path(value):
        return Path(value) if isinstance(value, (str, Path)) else None

    if is_anndata(data):
        options.update({k: path(v) if k.endswith("dictionary") else v for k, v in tokenize_options.items()})
    return SimpleNamespace(command=command, input=path(data), model_path=Path(model),
                           output=None if output is None else Path(output),
                           **{k: path(v) if k in ("base_model", "token_dictionary") else v for k, v in options.items()})


def predict(
    data: Any,
    *,
    model: PathLike,
    base_model: PathLike | None = None,
    key_added: str = "geneformer_pred",
    output: PathLike | None = None,
    label_column: str | None = "cell_type",
    batch_size: int = 64,
    max_length: int | None = None,
    unassign_threshold: float | None = None,
    device: str = "auto",
    allow_low_gene_overlap: bool = False,
    allow_other_base: bool = False,
    overwrite: bool = False,
    token_dictionary=None,
    gene_median_dictionary=None,
    gene_id_column: str | None = None,
    gene_name_id_dictionary=None,
):
    """Predict cell types with a fine-tuned fold (``geneformer-peft predict``).

    Parameters
    ----------
    data
        An AnnData of raw counts, a ``datasets.Dataset`` of tokenized cells or a saved one's folder.
    model
        A fold folder of a fine-tuning run (e.g. ``result.fold(0).folder``).
    base_model
        Apply the fold's PEFT-only weights on this base checkpoint.
    key_added
        With an AnnData: ``obs[key_added]`` gets the predicted labels and
        ``obs[key_added + "_confidence"]`` the top class probability.
    output
        Also write the table as CSV here.
    label_column, batch_size, max_length, unassign_threshold, device
        As the command's options, with its defaults.
    allow_low_gene_overlap, allow_other_base, overwrite
        As the command's flags.
    token_dictionary, gene_median_dictionary, gene_id_column, gene_name_id_dictionary
        Only for an AnnData: how to tokenize it (default: the model's dictionaries).

    Returns
    -------
    pandas.DataFrame
        One row per cell (indexed by ``obs_names`` for an AnnData): ``pred_celltype``,
        ``confidence``, a ``prob_<class>`` column per class, and the ground truth when present.
        ``frame.attrs["metrics"]`` holds accuracy and macro-F1 against ``label_column`` when present.
        A multi-task fold (docs/multitask.md): ``<task>_pred``, ``<task>_confidence``,
        ``<task>_prob_<label>`` and ``<task>_true`` per task, an AnnData's ``obs[key_added + "_" + task]``.
    """
    from geneformer_peft.commands.predict import write_predictions
    from geneformer_peft.evaluation.prediction import predict_cells

    prepare()
    tokenize_options = dict(token_dictionary=token_dictionary, gene_median_dictionary=gene_median_dictionary,
                            gene_id_column=gene_id_column, gene_name_id_dictionary=gene_name_id_dictionary)
    adata = data if is_anndata(data) else None
    settings = dict(base_model=base_model, label_column=label_column, batch_size=batch_size, max_length=max_length,
                    unassign_threshold=unassign_threshold, device=device,
                    allow_low_gene_overlap=allow_low_gene_overlap, allow_other_base=allow_other_base)

    def cells():
        return _cells(data, model, base_model=base_model, **tokenize_options)[0]

    if output is not None:  # through the command's run-safety guard, the cells made inside it
        options = _command_options("predict", data, model, output, tokenize_options, **settings,
                                   overwrite=overwrite)
        frame, metrics = write_predictions(options, cells=cells)
    else:
        frame, metrics = predict_cells(model, cells(), output=None, **settings)
    if adata is not None:
        import pandas as pd

        frame.index = adata.obs_names
        if "pred_celltype" in frame.columns:
            adata.obs[key_added] = pd.Categorical(frame["pred_celltype"].astype(str))
            adata.obs[f"{key_added}_confidence"] = frame["confidence"].to_numpy()
        else:  # a multi-task fold: obs[<key_added>_<task>] and its confidence per task
            for column in [c for c in frame.columns if c.endswith("_pred")]:
                task = column[:-len("_pred")]
                adata.obs[f"{key_added}_{task}"] = pd.Categorical(frame[column].astype(str))
                adata.obs[f"{key_added}_{task}_confidence"] = frame[f"{task}_confidence"].to_numpy()
    frame.attrs["metrics"] = metrics
    if metrics is not None and "accuracy" in metrics:
        logger.info("%d cells: accuracy %.4f, macro-F1 %.4f", len(frame), metrics["accuracy"], metrics["macro_f1"])
    return frame


def embed(
    data: Any,
    *,
    model: PathLike,
    base_model: PathLike | None = None,
    key_added: str = "X_geneformer",
    output: PathLike | None = None,
    emb_mode: str = "cell",
    emb_layer: int = -1,
    label_columns: Sequence[str] | None = None,
    max_ncells: int | None = None,
    batch_size: int = 64,
    precision: str = "auto",
    device: str = "auto",
    token_dictionary=None,
    gene_per_label: bool = False,
    plots: bool = True,
    random_init: bool = False,
    seed: int = 0,
    allow_low_gene_overlap: bool = False,
    allow_other_base: bool = False,
    overwrite: bool = False,
    gene_median_dictionary=None,
    gene_id_column: str | None = None,
    gene_name_id_dictionary=None,
):
    """Cell or gene embeddings (``geneformer-peft embed``).

    Parameters
    ----------
    data
        An AnnData of raw counts, a ``datasets.Dataset`` of tokenized cells or a saved one's folder.
    model
        A pretrained checkpoint, a fold folder, or (with ``base_model``) a fold's PEFT-only weights.
    key_added
        With an AnnData in cell/cls mode: ``obsm[key_added]`` gets the embeddings (in place).
    output
        Also write the embeddings here (``.h5ad``, ``.csv``, ``.parquet``) with the quality report
        ``embedding_metrics.json`` and, with ``plots``, the UMAP and heatmap beside it. Default:
        nothing is written (the report is in ``uns["embedding_metrics"]``; no plot files).
    emb_mode, emb_layer, label_columns, max_ncells, batch_size, precision, device, token_dictionary
        As the command's options, with its defaults (``emb_layer`` -1: the second-to-last layer;
        ``label_columns``: ``["cell_type"]`` when present).
    gene_per_label, plots, random_init, seed, allow_low_gene_overlap, allow_other_base, overwrite
        As the command's flags.
    gene_median_dictionary, gene_id_column, gene_name_id_dictionary
        Only for an AnnData: how to tokenize it (default: the model's dictionaries).

    Returns
    -------
    anndata.AnnData
        The AnnData given (embeddings in ``obsm[key_added]``); for a dataset, a new AnnData of
        its cells (``obs``: its columns; ``obsm[key_added]``); in gene mode, an AnnData over genes.
    """
    import anndata

    from geneformer_peft.analysis.runs import run_embed
    from geneformer_peft.commands.embed import write_embeddings

    prepare()
    if max_ncells is not None and is_anndata(data) and emb_mode != "gene":
        raise DataError("max_ncells would leave cells of the AnnData without an embedding; subset the AnnData instead")
    adata = data if is_anndata(data) else None

    def cells():
        return _cells(data, model, base_model=base_model, token_dictionary=token_dictionary if adata is not None
                      else None, gene_median_dictionary=gene_median_dictionary, gene_id_column=gene_id_column,
                      gene_name_id_dictionary=gene_name_id_dictionary)[0]

    with tempfile.TemporaryDirectory(prefix="gp_embed_") as tmp:
        if output is not None:  # through the command's run-safety guard, the cells made inside it
            target = Path(output)
            tokenize_options = dict(gene_median_dictionary=gene_median_dictionary, gene_id_column=gene_id_column,
                                    gene_name_id_dictionary=gene_name_id_dictionary)
            options = _command_options(
                "embed", data, model, output, tokenize_options,
                base_model=base_model, emb_mode=emb_mode, emb_layer=emb_layer,
                label_columns=list(label_columns) if label_columns else None, gene_per_label=gene_per_label,
                max_ncells=max_ncells, batch_size=batch_size, precision=precision, device=device,
                token_dictionary=token_dictionary, metrics_output=None, no_plots=not plots, random_init=random_init,
                seed=seed, allow_low_gene_overlap=allow_low_gene_overlap, allow_other_base=allow_other_base,
                overwrite=overwrite)
            result = write_embeddings(options, cells=cells)
        else:
            target = Path(tmp) / "embeddings.h5ad"
            result = run_embed(model, cells(), target, base_model=base_model, emb_mode=emb_mode,
                               emb_layer=emb_layer, label_columns=list(label_columns or ["cell_type"]),
                               max_ncells=max_ncells, batch_size=batch_size, device=device, precision=precision,
                               token_dictionary=token_dictionary, gene_per_label=gene_per_label, plots=False,
                               metrics_output=Path(tmp) / "embedding_metrics.json", random_init=random_init,
                               seed=seed, allow_low_gene_overlap=allow_low_gene_overlap,
                               allow_other_base=allow_other_base)
        if target.suffix.lower() == ".h5ad":
            out = anndata.read_h5ad(target)
        else:  # a table: read it back through the same writer's format
            out = _table_to_anndata(target, emb_mode)
    metrics = result.get("metrics") or {}
    if emb_mode == "gene":
        out.uns["embedding_metrics"] = metrics
        return out
    emb = out.obsm["X_geneformer"]
    if adata is not None:
        adata.obsm[key_added] = emb
        adata.uns["embedding_metrics"] = metrics
        return adata
    if key_added != "X_geneformer":
        out.obsm[key_added] = out.obsm.pop("X_geneformer")
    out.uns["embedding_metrics"] = metrics
    return out


def _table_to_anndata(path: Path, emb_mode: str):
    import anndata
    import pandas as pd

    frame = pd.read_csv(path) if path.suffix.lower() == ".csv" else pd.read_parquet(path)
    columns = [c for c in frame.columns if str(c).startswith("emb_")]
    if emb_mode == "gene":
        return anndata.AnnData(X=frame[columns].to_numpy(), obs=frame.drop(columns=columns).astype(str))
    out = anndata.AnnData(obs=frame.drop(columns=columns).reset_index(drop=True).astype(str))
    out.obsm["X_geneformer"] = frame[columns].to_numpy()
    return out


def perturb(
    data: Any,
    *,
    model: PathLike,
    genes: Sequence[str] | str,
    perturb_type: str = "delete",
    output_dir: PathLike | None = None,
    base_model: PathLike | None = None,
    combination: bool = False,
    rank_shift: float = 0.25,
    token_dictionary=None,
    filters: Sequence[str] | None = None,
    cell_states_to_model: Any = None,
    emb_mode: str = "cell",
    emb_layer: int = -1,
    max_ncells: int | None = None,
    n_null: int = 20,
    min_cells: int = 3,
    class_probabilities: bool = True,
    chunk_cells: int = 50,
    batch_size: int = 64,
    precision: str = "auto",
    device: str = "auto",
    seed: int = 0,
    plots: bool = True,
    allow_low_gene_overlap: bool = False,
    allow_other_base: bool = False,
    overwrite: bool = False,
    gene_median_dictionary=None,
    gene_id_column: str | None = None,
    gene_name_id_dictionary=None,
):
    """In silico perturbation with statistics (``geneformer-peft perturb``).

    Parameters
    ----------
    data
        An AnnData of raw counts, a ``datasets.Dataset`` of tokenized cells or a saved one's folder.
    model
        A pretrained checkpoint, a fold folder, or (with ``base_model``) a fold's PEFT-only weights.
    genes
        Ensembl ids to perturb, or ``"all"`` (every gene each cell expresses).
    perturb_type
        ``"delete"``, ``"overexpress"``, ``"inhibit"`` or ``"activate"``.
    output_dir
        Folder of the results (``gene_stats.csv``, ``perturbations.parquet``, ``volcano.png``;
        the same call again resumes). Default: a temporary folder, removed afterwards.
    combination, rank_shift, token_dictionary, filters, cell_states_to_model, emb_mode, emb_layer, \
max_ncells, n_null, min_cells, chunk_cells, batch_size, precision, device, seed
        As the command's options, with its defaults (``filters``: ``["column=value", ...]``;
        ``cell_states_to_model``: a dict, JSON text or a JSON file).
    class_probabilities, plots, allow_low_gene_overlap, allow_other_base, overwrite
        As the command's flags (``class_probabilities=False`` is ``--no_class_probabilities``).
    gene_median_dictionary, gene_id_column, gene_name_id_dictionary
        Only for an AnnData: how to tokenize it (default: the model's dictionaries).

    Returns
    -------
    pandas.DataFrame
        The ranked per-gene statistics (``gene_stats.csv``); ``attrs["summary"]`` holds the scan's
        summary (the per-cell results are ``perturbations.parquet`` in ``output_dir``).
    """
    import json

    from geneformer_peft.analysis.runs import run_perturb

    prepare()
    if isinstance(genes, str):
        genes = [genes]
    if isinstance(cell_states_to_model, dict):
        cell_states_to_model = json.dumps(cell_states_to_model)
    dataset, _ = _cells(data, model, base_model=base_model, gene_median_dictionary=gene_median_dictionary,
                        token_dictionary=token_dictionary if is_anndata(data) else None,
                        gene_id_column=gene_id_column, gene_name_id_dictionary=gene_name_id_dictionary)
    with tempfile.TemporaryDirectory(prefix="gp_perturb_") as tmp:
        out = run_perturb(model, dataset, Path(output_dir) if output_dir is not None else Path(tmp), genes=list(genes),
                          perturb_type=perturb_type, base_model=base_model, token_dictionary=token_dictionary,
                          filters=filters, cell_states_to_model=cell_states_to_model, emb_mode=emb_mode,
                          emb_layer=emb_layer, max_ncells=max_ncells, rank_shift=rank_shift,
                          combination=combination, n_null=n_null, seed=seed, chunk_cells=chunk_cells,
                          batch_size=batch_size, device=device, precision=precision, min_cells=min_cells,
                          class_probabilities=class_probabilities, plots=plots and output_dir is not None,
                          allow_low_gene_overlap=allow_low_gene_overlap, allow_other_base=allow_other_base,
                          overwrite=overwrite)
    stats = out["stats"]
    summary = out["summary"]
    stats.attrs["summary"] = summary
    logger.info("%d perturbations of %d cells; %d genes tested, %d with FDR < 0.05", summary["n_perturbations"],
                summary["n_cells"], summary["n_tested_genes"], summary["n_fdr_below_0.05"])
    return stats


def check(
    model: PathLike,
    data: Any,
    *,
    base_model: PathLike | None = None,
    token_dictionary=None,
    gene_median_dictionary=None,
    gene_id_column: str | None = None,
    gene_name_id_dictionary=None,
    label_column: str | None = None,
    max_length: int | None = None,
    allow_low_gene_overlap: bool = False,
    allow_other_base: bool = False,
    output: PathLike | None = None,
) -> dict[str, dict[str, Any]]:
    """The compatibility report of a model and data (``geneformer-peft check``), without raising.

    Parameters
    ----------
    model
        Checkpoint or fine-tuned fold folder.
    data
        A saved dataset's folder, a fold layout folder (one report per fold), a ``.h5ad``/``.loom``
        of raw counts, an AnnData of raw counts or a ``datasets.Dataset``.
    base_model, token_dictionary, gene_median_dictionary, gene_id_column, gene_name_id_dictionary, \
label_column, max_length, allow_low_gene_overlap, allow_other_base, output
        As the command's options.

    Returns
    -------
    dict
        Name (``"input"`` or ``"fold <i>"``) -> the report as a dict (``compatible``, ``findings``, ...,
        as in the JSON the command writes).
    """
    prepare()
    if isinstance(data, (str, Path)):
        from geneformer_peft.checks.inputs import check_input

        reports = check_input(model, data, base_model=base_model, token_dictionary=token_dictionary,
                              gene_median_dictionary=gene_median_dictionary, gene_id_column=gene_id_column,
                              gene_name_id_dictionary=gene_name_id_dictionary, label_column=label_column,
                              max_length=max_length, allow_low_gene_overlap=allow_low_gene_overlap,
                              allow_other_base=allow_other_base, output=output)
    else:
        from geneformer_peft.checks import check_compatibility

        dataset, _ = _cells(data, model, base_model=base_model, gene_median_dictionary=gene_median_dictionary,
                            gene_id_column=gene_id_column, gene_name_id_dictionary=gene_name_id_dictionary,
                            token_dictionary=token_dictionary if is_anndata(data) else None)
        if label_column is not None and label_column not in dataset.column_names:
            raise DataError(f"label_column {label_column!r}: the input has no such column; expected one of "
                            f"{[c for c in dataset.column_names if c != 'input_ids']}")
        reports = {"input": check_compatibility(model, {"input": dataset}, base_model=base_model,
                                                token_dictionary=token_dictionary, label_column=label_column,
                                                train_split=None, max_length=max_length,
                                                allow_low_gene_overlap=allow_low_gene_overlap,
                                                allow_other_base=allow_other_base)}
        if output is not None:
            from geneformer_peft.files import write_json

            write_json(output, {"input": "<in memory>", "kind": "dataset", "model_path": str(model),
                                "compatible": all(r.ok for r in reports.values()),
                                "reports": {name: r.to_dict() for name, r in reports.items()}})
    return {name: report.to_dict() for name, report in reports.items()}


def umap_or_explain(embeddings, *, seed: int = 0):
    """2-D UMAP coordinates of ``embeddings``; without the ``umap`` extra, an ImportError saying
    how to install it."""
    from geneformer_peft.analysis.figures import umap_coordinates

    coords = umap_coordinates(embeddings, seed=seed)
    if coords is None:
        raise ImportError("UMAP needs the umap extra: pip install 'geneformer-peft[umap]' (umap-learn)")
    return coords


def umap(adata: Any, *, key: str = "X_geneformer", color: str = "cell_type", seed: int = 0, title: str | None = None):
    """A UMAP of the embeddings ``adata.obsm[key]`` coloured by ``adata.obs[color]``.

    Parameters
    ----------
    adata
        An AnnData with embeddings (e.g. from :func:`embed`).
    key
        The ``obsm`` entry to reduce.
    color
        The ``obs`` column to colour by.
    seed
        Seed of the UMAP.
    title
        Figure title (default: the key).

    Returns
    -------
    matplotlib.figure.Figure
        The scatter plot; the coordinates are stored in ``adata.obsm["X_umap"]``.
    """
    from geneformer_peft.analysis.figures import plot_umap

    if key not in adata.obsm:
        raise DataError(f"adata.obsm has no {key!r}; expected one of {list(adata.obsm)} (run gp.embed first)")
    if color not in adata.obs:
        raise DataError(f"adata.obs has no column {color!r}; expected one of {list(adata.obs.columns)}")
    coords = umap_or_explain(adata.obsm[key], seed=seed)
    adata.obsm["X_umap"] = coords
    figure = plot_umap(coords, adata.obs[color].astype(str).to_numpy(), None, label_name=color,
                       title=title or f"UMAP of {key}")
    if figure is None:
        raise ImportError("figures need matplotlib: pip install 'geneformer-peft[plot]'")
    return figure
