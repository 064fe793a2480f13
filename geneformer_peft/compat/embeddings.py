"""``EmbExtractor`` with Geneformer's arguments, over :func:`geneformer_peft.embed`."""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from geneformer_peft.compat._options import filters_from, note_unused, refuse, refuse_unless

__all__ = ["EmbExtractor"]

_OWNER = "EmbExtractor"


class EmbExtractor:
    """Cell or gene embeddings under Geneformer's ``EmbExtractor`` argument names.

    Parameters
    ----------
    model_type
        ``"Pretrained"`` or ``"CellClassifier"`` (either way the model folder itself says which it
        is). ``"GeneClassifier"`` is refused.
    num_classes
        Accepted (the fold's ``config.json`` says how many).
    emb_mode
        ``"cell"`` (mean over the genes), ``"cls"`` (the ``<cls>`` position, V2) or ``"gene"``.
    cell_emb_style, gene_emb_style
        ``"mean_pool"`` only.
    filter_data
        ``{column: [values]}``: embed only these cells.
    max_ncells
        Embed the first N selected cells (Geneformer draws N at random; here the input order).
    emb_layer
        -1: the second-to-last layer (default), 0: the last (Geneformer's numbering).
    emb_label
        Columns kept beside the embeddings and scored (kNN accuracy, silhouette).
    labels_to_plot
        Columns :meth:`plot_embs` colours by (default: ``emb_label``).
    forward_batch_size
        Cells per forward pass.
    token_dictionary_file
        The data's token dictionary (default: the model folder's).
    nproc
        Accepted; without effect here (logged when given).
    summary_stat
        ``None`` only (every cell's embedding is returned).
    """

    def __init__(self, model_type: str = "Pretrained", num_classes: int = 0, emb_mode: str = "cell",
                 cell_emb_style: str = "mean_pool", gene_emb_style: str = "mean_pool", filter_data: Any = None,
                 max_ncells: int | None = 1000, emb_layer: int = -1, emb_label: Sequence[str] | None = None,
                 labels_to_plot: Sequence[str] | None = None, forward_batch_size: int = 100, nproc: int = 4,
                 summary_stat: str | None = None, token_dictionary_file: Any = None) -> None:
        refuse_unless(_OWNER, dict(model_type=model_type, emb_mode=emb_mode, cell_emb_style=cell_emb_style,
                                   gene_emb_style=gene_emb_style, summary_stat=summary_stat), {
            "model_type": (("Pretrained", "CellClassifier"), "gene classifiers are not embedded here"),
            "emb_mode": (("cell", "cls", "gene"), "expected 'cell', 'cls' or 'gene'"),
            "cell_emb_style": (("mean_pool",), "cells are embedded as the mean over their genes"),
            "gene_emb_style": (("mean_pool",), "genes are embedded as their mean over the cells expressing them"),
            "summary_stat": ((None,), "every cell's embedding is returned; summarise the DataFrame instead"),
        })
        if nproc != 4:
            note_unused(_OWNER, "nproc", nproc, "one process; device= picks the device")
        self.model_type = model_type
        self.num_classes = int(num_classes)
        self.emb_mode = emb_mode
        self.filters = filters_from(_OWNER, filter_data)
        self.max_ncells = max_ncells
        self.emb_layer = int(emb_layer)
        self.emb_label = list(emb_label or [])
        self.labels_to_plot = list(labels_to_plot or self.emb_label)
        self.forward_batch_size = int(forward_batch_size)
        self.token_dictionary_file = token_dictionary_file

    def extract_embs(self, model_directory: str | Path, input_data_file: str | Path, output_directory: str | Path,
                     output_prefix: str, output_torch_embs: bool = False, cell_state: Any = None):
        """Embed the cells (or genes) and write ``<output_directory>/<output_prefix>.csv``.

        Returns
        -------
        pandas.DataFrame
            One row per cell (per gene in gene mode): embedding columns ``0 .. d-1`` then the
            ``emb_label`` columns.
        """
        import pandas as pd

        from geneformer_peft.analysis.runs import select_rows
        from geneformer_peft.api import embed
        from geneformer_peft.api.preparation import as_dataset

        refuse_unless(_OWNER, dict(output_torch_embs=output_torch_embs, cell_state=cell_state), {
            "output_torch_embs": ((False,), "embeddings come back as a DataFrame (and an AnnData from gp.embed)"),
            "cell_state": ((None,), "select the cells with filter_data"),
        })
        model_directory = Path(model_directory)
        dataset = as_dataset(input_data_file, what="input_data_file")
        missing = [c for c in self.emb_label if c not in dataset.column_names]
        if missing:
            refuse(_OWNER, "emb_label", self.emb_label, f"{input_data_file} has no column(s) {missing}")
        rows = select_rows(dataset, filters=self.filters, max_ncells=self.max_ncells, source=str(input_data_file))
        dataset = dataset.select(rows)
        out = embed(dataset, model=model_directory, emb_mode=self.emb_mode, emb_layer=self.emb_layer,
                    label_columns=self.emb_label or None, batch_size=self.forward_batch_size,
                    token_dictionary=self.token_dictionary_file, plots=False)
        if self.emb_mode == "gene":
            frame = pd.DataFrame(out.X, index=out.obs_names)
        else:
            frame = pd.DataFrame(out.obsm["X_geneformer"])
            for column in self.emb_label:
                frame[column] = out.obs[column].to_numpy()
        output_directory = Path(output_directory)
        output_directory.mkdir(parents=True, exist_ok=True)
        frame.to_csv(output_directory / f"{output_prefix}.csv")
        return frame

    def plot_embs(self, embs, plot_style: str, output_directory: str | Path, output_prefix: str,
                  max_ncells_to_plot: int | None = 1000, kwargs_dict: Any = None) -> list[Path]:
        """UMAP (``plot_style="umap"``, needs the ``umap`` extra) or per-label heatmap (``"heatmap"``)
        of :meth:`extract_embs`'s DataFrame, one figure per column of ``labels_to_plot``.

        Returns
        -------
        list of pathlib.Path
            ``<output_directory>/<output_prefix>_<style>_<label>.png``.
        """
        from geneformer_peft.analysis.figures import plot_label_heatmap, plot_umap

        if plot_style not in ("umap", "heatmap"):
            refuse(_OWNER, "plot_style", plot_style, "expected 'umap' or 'heatmap'")
        if kwargs_dict is not None:
            refuse(_OWNER, "kwargs_dict", kwargs_dict, "the figures are drawn by the project's own plotting code")
        if not self.labels_to_plot:
            refuse(_OWNER, "labels_to_plot", self.labels_to_plot, "name the label columns to colour by")
        frame = embs if max_ncells_to_plot is None else embs.iloc[:max_ncells_to_plot]
        values = frame[[c for c in frame.columns if c not in self.emb_label]].to_numpy(dtype=float)
        coords = None
        if plot_style == "umap":
            from geneformer_peft.api.analysis import umap_or_explain

            coords = umap_or_explain(values)
        paths = []
        for label in self.labels_to_plot:
            path = Path(output_directory) / f"{output_prefix}_{plot_style}_{label}.png"
            if plot_style == "umap":
                plot_umap(coords, frame[label].astype(str).to_numpy(), path, label_name=label, title=f"UMAP: {label}")
            else:
                plot_label_heatmap(values, frame[label].astype(str).to_numpy(), path, label_name=label,
                                   title=f"mean embedding per {label}")
            paths.append(path)
        return paths
