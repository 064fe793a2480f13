"""The two analyses end to end, as the ``embed`` and ``perturb`` commands run them.

:func:`run_embed`: load the model and cells, extract embeddings, write the ``.h5ad`` (or
table), the quality report ``embedding_metrics.json`` and the plots.
:func:`run_perturb`: load, select cells, run (or resume) the scan, write the per-perturbation
results, the ranked gene table with FDR, the volcano plot and ``summary.json``.
"""
from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from geneformer_peft.analysis.cells import TokenizedCells, parse_filters
from geneformer_peft.analysis.embedding_quality import embedding_quality
from geneformer_peft.analysis.embeddings import (
    EMB_MODES,
    CellEmbeddings,
    analysis_version,
    embed_cell_batches,
    embed_genes,
    write_cell_embeddings,
    write_gene_embeddings,
)
from geneformer_peft.analysis.figures import plot_label_heatmap, plot_umap, plot_volcano, umap_coordinates
from geneformer_peft.analysis.layers import resolve_emb_layer
from geneformer_peft.analysis.loading import AnalysisModel, SpecialTokens, load_analysis_model, resolve_token_dictionary
from geneformer_peft.analysis.perturbation import SCAN_FILE, PerturbationScan, PerturbationSettings, parse_cell_states
from geneformer_peft.analysis.perturbation_stats import perturbation_statistics
from geneformer_peft.data.dataset_io import load_saved_dataset
from geneformer_peft.data.filters import format_column_values
from geneformer_peft.errors import DataError
from geneformer_peft.files import atomic_directory, atomic_file, write_json
from geneformer_peft.models.device import resolve_device
from geneformer_peft.training.run_safety import input_fingerprint
from geneformer_peft.training import distributed
from geneformer_peft.models.families import family_of_config

__all__ = ["METRICS_FILE", "gene_tokens", "run_embed", "run_perturb", "select_rows"]

logger = logging.getLogger(__name__)

METRICS_FILE = "embedding_metrics.json"


def _model_name(am: AnalysisModel) -> str:
    parts = Path(am.source).parts if am.kind != "random" else (am.source,)
    return "/".join(parts[-3:]) if len(parts) > 1 else str(parts[0])


def _safe_name(value: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in str(value))


def select_rows(dataset, *, filters: Sequence[str] | None = None, max_ncells: int | None = None,
                source: str = "input") -> np.ndarray:
    """Row numbers of ``dataset`` passing every ``COLUMN=VALUE[,VALUE]`` filter, the first
    ``max_ncells`` of them (input order).

    Raises
    ------
    DataError
        For a filter on a missing column, or a selection without cells.
    """
    rows = np.arange(len(dataset))
    for column, values in parse_filters(filters):
        if column not in dataset.column_names:
            raise DataError(f"--filter {column}=...: {source} has no column {column!r}; expected one of "
                            f"{[c for c in dataset.column_names if c != 'input_ids']}")
        col = np.asarray(dataset.data.column(column).to_numpy(zero_copy_only=False)).astype(str)
        rows = rows[np.isin(col[rows], sorted(values))]
    if max_ncells is not None:
        if max_ncells < 1:
            raise DataError(f"--max_ncells {max_ncells}; expected a positive number of cells")
        rows = rows[:max_ncells]
    if rows.size == 0:
        raise DataError(f"{source}: no cell passes the filters {list(filters or [])}; expected at least one")
    return rows


def _info(am: AnalysisModel, *, mode: str, emb_layer: int, input_path, token_path, n_cells: int) -> dict[str, Any]:
    return {"model_path": am.source, "base_model": am.base_model, "model_kind": am.kind, "emb_mode": mode,
            "emb_layer": int(emb_layer), "hidden_states_index": resolve_emb_layer(emb_layer, am.num_layers),
            "num_hidden_layers": am.num_layers, "input": str(input_path), "token_dictionary": token_path,
            "n_cells": int(n_cells), "version": analysis_version()}


#: how an in-memory dataset is named in messages and provenance
IN_MEMORY = "<dataset in memory>"


def input_dataset(input_path) -> tuple[Any, Any]:
    """``(dataset, name)`` of a saved dataset's folder, or of a ``datasets.Dataset`` already in
    memory (the Python API passes one), named :data:`IN_MEMORY`."""
    if hasattr(input_path, "column_names"):
        return input_path, IN_MEMORY
    return load_saved_dataset(input_path), input_path


def check_analysis_input(model_path, dataset, input_path, *, base_model=None, token_dictionary=None,
                         allow_low_gene_overlap: bool = False, allow_other_base: bool = False):
    """The compatibility report of an analysis's model and input (before the model is loaded);
    raises on a refusal, returns the report otherwise."""
    from geneformer_peft.checks import check_compatibility

    report = check_compatibility(model_path, {str(input_path): dataset}, token_dictionary=token_dictionary,
                                 base_model=base_model, allow_low_gene_overlap=allow_low_gene_overlap,
                                 allow_other_base=allow_other_base)
    report.raise_if_refused()
    return report


def run_embed(model_path, input_path, output, *, base_model=None, emb_mode: str = "cell", emb_layer: int = -1,
              label_columns: Sequence[str] = ("cell_type",), max_ncells: int | None = None, batch_size: int = 64,
              device: str = "auto", precision: str = "auto", token_dictionary=None, gene_per_label: bool = False,
              plots: bool = True, metrics_output=None, random_init: bool = False, seed: int = 0,
              allow_low_gene_overlap: bool = False, allow_other_base: bool = False,
              write_to=None) -> dict[str, Any]:
    """Extract embeddings and write them with their quality report and plots.

    Under ``torchrun`` (cell and cls modes) each rank embeds every ``world_size``-th batch and
    rank 0 writes the outputs, in input order, identical to one process.

    Label columns missing from the input are an error only when named explicitly
    (the default ``cell_type`` is skipped with a message when absent). ``write_to``: write the
    embeddings table there instead of to ``output`` (a temporary name the caller moves onto
    ``output`` when complete; the report and plot names still derive from ``output``).

    Returns
    -------
    dict
        ``output``, ``metrics`` (per label column), ``metrics_file``, ``plots`` (paths).
    """
    if emb_mode not in EMB_MODES:
        raise DataError(f"--emb_mode {emb_mode!r}; expected one of {list(EMB_MODES)}")
    output = Path(output)
    table = Path(write_to) if write_to is not None else output
    dev = _join_torchrun(resolve_device(device))
    if emb_mode == "gene" and distributed.world_size() > 1:
        raise DataError("--emb_mode gene runs in one process; start it without torchrun "
                        f"(this is rank {distributed.rank()} of {distributed.world_size()})")
    dataset, input_path = input_dataset(input_path)
    check_analysis_input(model_path, dataset, input_path, base_model=base_model, token_dictionary=token_dictionary,
                         allow_low_gene_overlap=allow_low_gene_overlap or random_init,
                         allow_other_base=allow_other_base)
    am = load_analysis_model(model_path, base_model, random_init=random_init, seed=seed)
    resolve_emb_layer(emb_layer, am.num_layers)
    if emb_mode == "gene" and family_of_config(am.config).values_column is not None:
        raise DataError(f"--emb_mode gene is not written for a {family_of_config(am.config).model_type[0]} model; "
                        "use --emb_mode cls (the cell's cls state) or cell (the mean over its genes)")
    tokens, token_path = resolve_token_dictionary(token_dictionary, model_path, base_model)
    specials = SpecialTokens.from_dictionary(tokens)
    cells = TokenizedCells(dataset, select_rows(dataset, max_ncells=max_ncells, source=str(input_path)),
                           max_length=am.max_input_size, name=str(input_path))
    labels = [c for c in label_columns if c in dataset.column_names]
    missing = [c for c in label_columns if c not in dataset.column_names]
    if missing and list(label_columns) != ["cell_type"]:
        raise DataError(f"--label_column {missing}: {input_path} has no such column; expected one of "
                        f"{[c for c in dataset.column_names if c != 'input_ids']}")
    info = _info(am, mode=emb_mode, emb_layer=emb_layer, input_path=input_path, token_path=token_path,
                 n_cells=len(cells))
    title = f"{_model_name(am)}, emb_layer {emb_layer} (layer {info['hidden_states_index']} of {am.num_layers})"
    result: dict[str, Any] = {"output": output, "metrics": {}, "plots": [], "metrics_file": None}
    if emb_mode == "gene":
        token_to_gene = {v: k for k, v in tokens.items()} if tokens else None
        per_label = cells.column(labels[0]) if gene_per_label and labels else None
        if gene_per_label and not labels:
            raise DataError("--gene_per_label needs a --label_column present in the input")
        genes = embed_genes(am.model, cells, specials=specials, emb_layer=emb_layer, labels=per_label,
                            batch_size=batch_size, device=dev, precision=precision, token_to_gene=token_to_gene,
                            progress=True)
        genes.info = {**info, "label_column": labels[0] if per_label is not None else None}
        write_gene_embeddings(genes, table)
        logger.info("%d genes (over %d cells) -> %s", len(genes.tokens), len(cells), output)
        result["n_genes"] = len(genes.tokens)
        return result
    # under torchrun each rank embeds every world_size-th batch; rank 0 writes them all in input order
    positions, part = embed_cell_batches(am.model, cells, specials=specials, mode=emb_mode, emb_layer=emb_layer,
                                         batch_size=batch_size, device=dev, precision=precision, progress=True,
                                         shard=(distributed.rank(), distributed.world_size()))
    emb = distributed.gather_rows(positions, part, len(cells))
    if emb is None:  # not rank 0: rank 0 writes the outputs
        return result
    obs = cells.obs()
    if am.is_classifier and not random_init:
        obs = _with_task_probabilities(obs, am, dataset, cells, batch_size=batch_size, device=dev)
    write_cell_embeddings(CellEmbeddings(emb, obs, info), table)
    logger.info("%d cell embeddings (%d dims) -> %s", *emb.shape, output)
    if labels:
        metrics = {c: _quality_of_labelled(emb, cells.column(c), c, seed=seed) for c in labels}
        metrics_file = Path(metrics_output) if metrics_output else output.parent / METRICS_FILE
        write_json(metrics_file, {**info, "output": str(output), "labels": metrics})
        result.update(metrics=metrics, metrics_file=metrics_file)
        if plots:
            coords = umap_coordinates(emb, seed=seed)
            for c in labels:
                stem = output.with_suffix("").name
                if coords is not None:
                    path = plot_umap(coords, cells.column(c), output.parent / f"{stem}.umap.{_safe_name(c)}.png",
                                     label_name=c, title=f"UMAP of {emb_mode} embeddings\n{title}")
                    result["plots"].append(path)
                path = plot_label_heatmap(emb, cells.column(c), output.parent / f"{stem}.heatmap.{_safe_name(c)}.png",
                                          label_name=c, title=f"Mean {emb_mode} embedding per {c}\n{title}")
                result["plots"].append(path)
        result["plots"] = [p for p in result["plots"] if p is not None]
    return result


def _quality_of_labelled(emb, values, column: str, *, seed: int) -> dict[str, Any]:
    """:func:`embedding_quality` over the cells whose ``column`` holds a label (a missing one,
    ``None``, NaN or empty, as a multi-task run's, is not a class)."""
    from geneformer_peft.evaluation.tasks import is_missing

    known = np.array([not is_missing(v) for v in values], dtype=bool)
    if known.all():
        return embedding_quality(emb, values, seed=seed)
    logger.info("label column %r: %d of %d cells have no label and are left out of its metrics", column,
                int((~known).sum()), len(known))
    return embedding_quality(emb[known], [v for v, k in zip(values, known) if k], seed=seed)


def _with_task_probabilities(obs, am: AnalysisModel, dataset, cells, *, batch_size: int, device):
    """``obs`` with a multi-task fold's probability readout per task: ``<task>_pred``,
    ``<task>_confidence`` and ``<task>_prob_<label>`` (softmax over the task's own head), from
    the whole model; unchanged for a single-task classifier."""
    from geneformer_peft.data.cells import EncodedCells
    from geneformer_peft.evaluation.inference import predict_logits
    import pandas as pd

    from geneformer_peft.evaluation.tasks import TaskSet, task_predictions_frame

    tasks = TaskSet.from_config(am.config)
    if tasks is None:
        return obs
    family = family_of_config(am.config)
    length = family.data_length(family.input_length(am.config))
    encoded = EncodedCells.from_dataset(dataset.select(list(cells.rows)), max_length=length, name=cells.name,
                                        values_column=family.values_column)
    logits = predict_logits(am.model, encoded, batch_size=batch_size, device=device)
    readout = task_predictions_frame(tasks, logits, cell_index=obs.index).drop(columns=["index"])
    readout.index = obs.index
    clash = [c for c in readout.columns if c in obs.columns]
    if clash:
        raise DataError(f"the input already has columns {clash}, which the multi-task readout writes; rename them")
    logger.info("multi-task readout: predictions and class probabilities of tasks %s added to the cells' table",
                tasks.names)
    return pd.concat([obs, readout], axis=1)


def _join_torchrun(device):
    """Join the process group when started by ``torchrun`` (gloo on CPU, NCCL on CUDA, each rank
    on its own GPU); the device to use."""
    if distributed.launched_by_torchrun():
        distributed.init_distributed(device)
        device = distributed.local_device(device)
        if device.type == "cuda":
            import torch

            torch.cuda.set_device(device)
    return device


def gene_tokens(genes: Sequence[str], token_dictionary: dict[str, int] | None, source: str | None) -> list[int]:
    """Token ids of gene ids; an unknown id (or a special token) is a clear error naming it."""
    if token_dictionary is None:
        raise DataError("--genes lists gene ids, but no token dictionary was found; pass --token_dictionary "
                        "(the checkpoint's token_dictionary.pkl)")
    unknown = [g for g in genes if g not in token_dictionary]
    special = [g for g in genes if g.startswith("<") and g.endswith(">")]
    if unknown or special:
        raise DataError(f"--genes: {unknown + special} {'is' if len(unknown + special) == 1 else 'are'} not "
                        f"gene ids of the token dictionary {source}; expected Ensembl ids such as "
                        f"{next((k for k in token_dictionary if not k.startswith('<')), 'ENSG...')}")
    if len(set(genes)) != len(genes):
        raise DataError(f"--genes lists a gene twice: {genes}")
    return [int(token_dictionary[g]) for g in genes]


def run_perturb(model_path, input_path, output_dir, *, genes: Sequence[str], perturb_type: str = "delete",
                base_model=None, token_dictionary=None, filters: Sequence[str] | None = None,
                cell_states_to_model=None, emb_mode: str = "cell", emb_layer: int = -1,
                max_ncells: int | None = None, rank_shift: float = 0.25, combination: bool = False,
                n_null: int = 20, seed: int = 0, chunk_cells: int = 50, batch_size: int = 64, device: str = "auto",
                precision: str = "auto", min_cells: int = 3, class_probabilities: bool = True,
                plots: bool = True, overwrite: bool = False, allow_low_gene_overlap: bool = False,
                allow_other_base: bool = False) -> dict[str, Any]:
    """Run a perturbation scan and write its outputs under ``output_dir``.

    An unfinished scan with the same settings resumes; ``overwrite`` replaces a scan made with
    other settings, building the new one beside it and swapping it in only when complete (an
    interrupted overwrite leaves the old scan whole).

    Under ``torchrun`` each rank computes every ``world_size``-th chunk of cells and rank 0
    writes the outputs from all chunks (the same files as one process; resumable as ever).

    Returns
    -------
    dict
        ``stats`` (ranked DataFrame), ``summary`` (dict) and the written paths.
    """
    options = {k: v for k, v in locals().items() if k not in ("model_path", "input_path", "output_dir", "genes",
                                                               "overwrite")}
    output_dir = Path(output_dir)
    if overwrite and (output_dir / SCAN_FILE).is_file():
        with atomic_directory(output_dir, overwrite=True) as building:
            result = run_perturb(model_path, input_path, building, genes=genes, overwrite=False, **options)
        result["paths"] = {name: output_dir / Path(path).relative_to(building)
                           for name, path in result["paths"].items()}
        return result
    dev = _join_torchrun(resolve_device(device))
    dataset, input_path = input_dataset(input_path)
    check_analysis_input(model_path, dataset, input_path, base_model=base_model, token_dictionary=token_dictionary,
                         allow_low_gene_overlap=allow_low_gene_overlap, allow_other_base=allow_other_base)
    am = load_analysis_model(model_path, base_model)
    resolve_emb_layer(emb_layer, am.num_layers)
    tokens, token_path = resolve_token_dictionary(token_dictionary, model_path, base_model)
    every = [g.lower() for g in genes] == ["all"]
    token_ids = None if every else gene_tokens(list(genes), tokens, str(token_path))
    states = parse_cell_states(cell_states_to_model)
    settings = PerturbationSettings(perturb_type=perturb_type, genes=None if every else tuple(token_ids),
                                    combination=combination, emb_mode=emb_mode, emb_layer=emb_layer,
                                    rank_shift=rank_shift, n_null=n_null, seed=seed, chunk_cells=chunk_cells,
                                    batch_size=batch_size, cell_states=states,
                                    class_probabilities=class_probabilities)
    chosen = list(filters or [])
    if states is not None:
        if states.state_key not in dataset.column_names:
            raise DataError(f"--cell_states_to_model: {input_path} has no column {states.state_key!r}; expected one "
                            f"of {[c for c in dataset.column_names if c != 'input_ids']}")
        chosen.append(format_column_values(states.state_key, [states.start_state]))
    rows = select_rows(dataset, filters=chosen, max_ncells=max_ncells, source=str(input_path))
    cells = TokenizedCells(dataset, rows, max_length=am.max_input_size, name=str(input_path))
    state_cells = TokenizedCells(dataset, max_length=am.max_input_size, name=str(input_path)) if states else None
    token_to_gene = {v: k for k, v in tokens.items()} if tokens else None
    provenance = {"model_path": str(model_path), "base_model": None if base_model is None else str(base_model),
                  "input": str(input_path), "filters": chosen, "max_ncells": max_ncells,
                  "files": {"model_path": input_fingerprint(model_path), "base_model": input_fingerprint(base_model),
                            "token_dictionary": input_fingerprint(token_path),
                            "input": input_fingerprint(input_path)}}
    scan = PerturbationScan(am, cells, specials=SpecialTokens.from_dictionary(tokens), settings=settings,
                            output_dir=output_dir, device=dev, precision=precision, token_to_gene=token_to_gene,
                            state_cells=state_cells, provenance=provenance, progress=True)
    summary = scan.run(overwrite=overwrite)  # under torchrun: each rank its share of the chunks
    results = scan.results()
    measure = f"shift_to_{states.goal_state}" if states else "cosine_sim"
    listed = None if every else (["+".join(genes)] if combination else list(genes))
    stats = perturbation_statistics(results, measure=measure, min_cells=min_cells,
                                    n_cells_absent=None if every else summary.n_cells_absent, listed=listed)
    paths = {"results": output_dir / "perturbations.parquet", "stats": output_dir / "gene_stats.csv",
             "summary": output_dir / "summary.json"}
    if not distributed.is_main_process():  # every rank read the same chunks; rank 0 writes
        return {"stats": stats, "summary": {**asdict(summary), "measure": measure}, "paths": paths,
                "results": results}
    with atomic_file(paths["results"], suffix=".parquet") as tmp:
        results.to_parquet(tmp, index=False)
    with atomic_file(paths["stats"], suffix=".csv") as tmp:
        stats.to_csv(tmp, index=False)
    shifts = scan.gene_shifts()
    if shifts is not None:
        paths["gene_shifts"] = output_dir / "gene_shifts.csv"
        with atomic_file(paths["gene_shifts"], suffix=".csv") as tmp:
            shifts.to_csv(tmp, index=False)
    if plots:
        effect_label = (f"mean shift toward {states.goal_state} minus random-gene null" if states else
                        "mean cosine similarity minus random-gene null (negative: moves cells more)")
        what = "every gene" if every else ", ".join(genes)
        title = (f"{perturb_type} of {what if len(what) <= 60 else what[:57] + '...'}\n{_model_name(am)}, "
                 f"emb_layer {emb_layer}")
        volcano = plot_volcano(stats, output_dir / "volcano.png", effect_column="effect", effect_label=effect_label,
                               title=title)
        if volcano is not None:
            paths["volcano"] = volcano
    summary_dict = {**asdict(summary), "measure": measure, "layers_run": scan.layers_run,
                    "num_hidden_layers": am.num_layers, "model_kind": am.kind,
                    "class_probabilities": scan.class_names, "settings": settings.fingerprint(),
                    "provenance": provenance, "version": analysis_version(),
                    "n_tested_genes": int(stats["p_value"].notna().sum()),
                    "n_fdr_below_0.05": int((stats["fdr"] < 0.05).sum())}
    write_json(paths["summary"], summary_dict)
    return {"stats": stats, "summary": summary_dict, "paths": paths, "results": results}
