"""``InSilicoPerturber`` and ``InSilicoPerturberStats`` with Geneformer's arguments, over
:func:`geneformer_peft.perturb` (which computes the statistics in the same run)."""
from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from geneformer_peft.compat._options import filters_from, note_unused, refuse, refuse_unless

__all__ = ["InSilicoPerturber", "InSilicoPerturberStats"]

_OWNER = "InSilicoPerturber"
_STATS = "InSilicoPerturberStats"


class InSilicoPerturber:
    """In silico perturbation under Geneformer's ``InSilicoPerturber`` argument names.

    Parameters
    ----------
    perturb_type
        ``"delete"``, ``"overexpress"``, ``"inhibit"`` or ``"activate"``.
    perturb_rank_shift
        inhibit / activate: quartiles to move the gene by (1 = a quarter of the cell's genes);
        default 1.
    genes_to_perturb
        ``"all"`` (each expressed gene on its own) or a list of Ensembl ids, perturbed together.
    combos, anchor_gene
        ``0`` and ``None`` only.
    model_type, num_classes
        Accepted (the model folder says what it is).
    emb_mode
        ``"cell"``, ``"cls"`` or ``"cell_and_gene"``.
    cell_emb_style
        ``"mean_pool"`` only.
    filter_data
        ``{column: [values]}``: perturb only these cells.
    cell_states_to_model
        ``{"state_key": ..., "start_state": ..., "goal_state": ..., "alt_states": [...]}``.
    state_embs_dict
        Accepted; the state embeddings are computed here from the input's cells of each state.
    max_ncells
        Perturb the first N selected cells.
    cell_inds_to_perturb
        ``"all"`` only (select with ``filter_data`` / ``max_ncells``).
    emb_layer
        -1: the second-to-last layer (default), 0: the last.
    forward_batch_size
        Perturbed cells per forward pass.
    token_dictionary_file
        The data's token dictionary (default: the model folder's).
    nproc, clear_mem_ncells
        Accepted; without effect here (logged when given).
    """

    def __init__(self, perturb_type: str = "delete", perturb_rank_shift: int | None = None,
                 genes_to_perturb: str | Sequence[str] = "all", combos: int = 0, anchor_gene: str | None = None,
                 model_type: str = "Pretrained", num_classes: int = 0, emb_mode: str = "cell",
                 cell_emb_style: str = "mean_pool", filter_data: Any = None,
                 cell_states_to_model: Mapping | None = None, state_embs_dict: Mapping | None = None,
                 max_ncells: int | None = None, cell_inds_to_perturb: Any = "all", emb_layer: int = -1,
                 forward_batch_size: int = 100, nproc: int = 4, token_dictionary_file: Any = None,
                 clear_mem_ncells: int = 1000) -> None:
        refuse_unless(_OWNER, dict(perturb_type=perturb_type, combos=combos, anchor_gene=anchor_gene,
                                   model_type=model_type, emb_mode=emb_mode, cell_emb_style=cell_emb_style,
                                   cell_inds_to_perturb=cell_inds_to_perturb), {
            "perturb_type": (("delete", "overexpress", "inhibit", "activate"),
                             "expected 'delete', 'overexpress', 'inhibit' or 'activate'"),
            "combos": ((0,), "pairwise combinations with an anchor gene are not scanned here; list genes in "
                             "genes_to_perturb to perturb them together"),
            "anchor_gene": ((None,), "pairwise combinations with an anchor gene are not scanned here"),
            "model_type": (("Pretrained", "CellClassifier"), "gene classifiers are not perturbed here"),
            "emb_mode": (("cell", "cls", "cell_and_gene"), "expected 'cell', 'cls' or 'cell_and_gene'"),
            "cell_emb_style": (("mean_pool",), "cells are embedded as the mean over their genes"),
            "cell_inds_to_perturb": (("all",), "select cells with filter_data and max_ncells"),
        })
        if perturb_rank_shift is not None and perturb_type not in ("inhibit", "activate"):
            refuse(_OWNER, "perturb_rank_shift", perturb_rank_shift, "it applies to inhibit and activate only")
        if state_embs_dict is not None:
            note_unused(_OWNER, "state_embs_dict", "{...}",
                        "the state embeddings are computed from the input's cells of each state")
        for name, value, default in (("nproc", nproc, 4), ("clear_mem_ncells", clear_mem_ncells, 1000)):
            if value != default:
                note_unused(_OWNER, name, value, "one process; results are written in chunks")
        self.perturb_type = perturb_type
        self.rank_shift = 0.25 * (1 if perturb_rank_shift is None else float(perturb_rank_shift))
        every = isinstance(genes_to_perturb, str) and genes_to_perturb == "all"
        self.genes = ["all"] if every else ([genes_to_perturb] if isinstance(genes_to_perturb, str)
                                            else list(genes_to_perturb))
        self.combination = not every and len(self.genes) > 1
        self.emb_mode = emb_mode
        self.filters = filters_from(_OWNER, filter_data)
        self.cell_states_to_model = None if cell_states_to_model is None else dict(cell_states_to_model)
        self.max_ncells = max_ncells
        self.emb_layer = int(emb_layer)
        self.forward_batch_size = int(forward_batch_size)
        self.token_dictionary_file = token_dictionary_file

    def perturb_data(self, model_directory: str | Path, input_data_file: str | Path, output_directory: str | Path,
                     output_prefix: str):
        """Run the scan into ``<output_directory>/<output_prefix>/`` (``gene_stats.csv``,
        ``perturbations.parquet``, ``summary.json``, ``volcano.png``); the same call resumes.

        Returns
        -------
        pandas.DataFrame
            The ranked per-gene statistics (what :class:`InSilicoPerturberStats` reads back).
        """
        from geneformer_peft.api import perturb

        return perturb(input_data_file, model=model_directory, genes=self.genes, perturb_type=self.perturb_type,
                       output_dir=Path(output_directory) / output_prefix, combination=self.combination,
                       rank_shift=self.rank_shift, token_dictionary=self.token_dictionary_file,
                       filters=self.filters or None, cell_states_to_model=self.cell_states_to_model,
                       emb_mode=self.emb_mode, emb_layer=self.emb_layer, max_ncells=self.max_ncells,
                       batch_size=self.forward_batch_size)


class InSilicoPerturberStats:
    """Statistics of a perturbation scan under Geneformer's ``InSilicoPerturberStats`` names.

    The scan here already tests each gene against random-gene perturbations of the same cells
    (Mann-Whitney U, Benjamini-Hochberg FDR) and writes the table; this class reads it back
    from :meth:`InSilicoPerturber.perturb_data`'s folder and writes it where Geneformer would.

    Parameters
    ----------
    mode
        ``"vs_null"`` (against the random-gene null), ``"goal_state_shift"`` (a scan with
        ``cell_states_to_model``), ``"aggregate_data"`` (the per-cell results) or
        ``"aggregate_gene_shifts"`` (a scan with ``emb_mode="cell_and_gene"``).
        ``"mixture_model"`` is refused.
    genes_perturbed
        ``"all"`` or the list the scan perturbed (checked against it).
    combos, anchor_gene
        ``0`` and ``None`` only.
    cell_states_to_model
        As given to the perturber (checked against the scan).
    pickle_suffix, token_dictionary_file, gene_median_file, gene_name_id_dictionary_file, model_version
        Accepted; the scan's tables already name genes by Ensembl id (logged when given).
    """

    def __init__(self, mode: str = "mixture_model", genes_perturbed: str | Sequence[str] = "all", combos: int = 0,
                 anchor_gene: str | None = None, cell_states_to_model: Mapping | None = None,
                 pickle_suffix: str = "_raw.pickle", token_dictionary_file: Any = None, gene_median_file: Any = None,
                 gene_name_id_dictionary_file: Any = None, model_version: str | None = None) -> None:
        refuse_unless(_STATS, dict(mode=mode, combos=combos, anchor_gene=anchor_gene), {
            "mode": (("vs_null", "goal_state_shift", "aggregate_data", "aggregate_gene_shifts"),
                     "the statistics here test each gene against random-gene perturbations (mode='vs_null', or "
                     "'goal_state_shift' for a scan with cell_states_to_model); no mixture model is fitted"),
            "combos": ((0,), "pairwise combinations are not scanned here"),
            "anchor_gene": ((None,), "pairwise combinations are not scanned here"),
        })
        for name, value in (("token_dictionary_file", token_dictionary_file), ("gene_median_file", gene_median_file),
                            ("gene_name_id_dictionary_file", gene_name_id_dictionary_file),
                            ("model_version", model_version)):
            if value is not None:
                note_unused(_STATS, name, value, "the scan's tables already name genes by Ensembl id")
        if pickle_suffix != "_raw.pickle":
            note_unused(_STATS, "pickle_suffix", pickle_suffix, "the scan writes parquet and csv tables")
        self.mode = mode
        self.genes_perturbed = genes_perturbed
        self.cell_states_to_model = None if cell_states_to_model is None else dict(cell_states_to_model)

    def get_stats(self, input_data_directory: str | Path, null_dist_data_directory: Any,
                  output_directory: str | Path, output_prefix: str, null_dict_list: Any = None):
        """Read the scan in ``input_data_directory`` (``<output_directory>/<output_prefix>`` of
        :meth:`InSilicoPerturber.perturb_data`) and write ``<output_directory>/<output_prefix>.csv``.

        Returns
        -------
        pandas.DataFrame
            The statistics (or, for ``aggregate_data``, the per-cell results).
        """
        import pandas as pd

        refuse_unless(_STATS, dict(null_dist_data_directory=null_dist_data_directory, null_dict_list=null_dict_list),
                      {name: ((None,), "the null distribution is drawn inside the scan (random-gene perturbations "
                                       "of the same cells, n_null per cell)")
                       for name in ("null_dist_data_directory", "null_dict_list")})
        scan = Path(input_data_directory)
        summary_path = scan / "summary.json"
        if not summary_path.is_file():
            refuse(_STATS, "input_data_directory", str(scan), "it holds no summary.json of a finished scan "
                   "(InSilicoPerturber.perturb_data's <output_directory>/<output_prefix>)")
        summary = json.loads(summary_path.read_text(encoding="utf-8"))
        goal = str(summary.get("measure", "")).startswith("shift_to_")
        if self.mode == "goal_state_shift" and not goal:
            refuse(_STATS, "mode", self.mode, f"the scan in {scan} ran without cell_states_to_model; use 'vs_null'")
        if self.mode == "vs_null" and goal:
            refuse(_STATS, "mode", self.mode, f"the scan in {scan} modelled cell states; use 'goal_state_shift'")
        if self.mode == "aggregate_data":
            frame = pd.read_parquet(scan / "perturbations.parquet")
        elif self.mode == "aggregate_gene_shifts":
            if not (scan / "gene_shifts.csv").is_file():
                refuse(_STATS, "mode", self.mode, f"the scan in {scan} ran without emb_mode='cell_and_gene'")
            frame = pd.read_csv(scan / "gene_shifts.csv")
        else:
            frame = pd.read_csv(scan / "gene_stats.csv")
            if self.genes_perturbed != "all":
                listed = set(self.genes_perturbed) | {"+".join(self.genes_perturbed)}
                if not set(frame["gene"].astype(str)) & listed:
                    refuse(_STATS, "genes_perturbed", self.genes_perturbed, f"the scan in {scan} perturbed "
                           f"{sorted(set(frame['gene'].astype(str)))[:5]}...")
        output = Path(output_directory) / f"{output_prefix}.csv"
        output.parent.mkdir(parents=True, exist_ok=True)
        frame.to_csv(output, index=False)
        return frame
