"""Analyses of a trained model: cell and gene embeddings, in silico perturbation.

- :mod:`.layers`: forward passes that stop at the requested layer;
- :mod:`.loading`: any checkpoint (pretrained, fold, PEFT weights on a base) and its vocabulary;
- :mod:`.cells`: tokenized cells read in windows;
- :mod:`.embeddings`: cell (mean / ``<cls>``) and gene embeddings, AnnData / table output;
- :mod:`.embedding_quality`: kNN accuracy and silhouette width of labels;
- :mod:`.perturbation` / :mod:`.perturbation_stats`: perturbation scans and their statistics;
- :mod:`.figures`: UMAP, heatmap and volcano plots;
- :mod:`.runs`: both analyses end to end (what the ``embed`` and ``perturb`` commands run).

Documentation: ``docs/analysis.md``.
"""
from geneformer_peft.analysis.cells import TokenizedCells, length_grouped_batches, parse_filters
from geneformer_peft.analysis.embedding_quality import embedding_quality
from geneformer_peft.analysis.embeddings import (
    EMB_MODES,
    OBSM_KEY,
    CellEmbeddings,
    GeneEmbeddings,
    embed_cells,
    embed_genes,
    write_cell_embeddings,
    write_gene_embeddings,
)
from geneformer_peft.analysis.layers import LayerReader, resolve_emb_layer, truncated_encoder
from geneformer_peft.analysis.loading import AnalysisModel, SpecialTokens, load_analysis_model, resolve_token_dictionary
from geneformer_peft.analysis.perturbation import (
    PERTURB_EMB_MODES,
    PERTURB_TYPES,
    CellStates,
    PerturbationScan,
    PerturbationSettings,
    parse_cell_states,
    perturb_genes,
)
from geneformer_peft.analysis.perturbation_stats import benjamini_hochberg, perturbation_statistics
from geneformer_peft.analysis.runs import run_embed, run_perturb

__all__ = [
    "EMB_MODES", "OBSM_KEY", "PERTURB_EMB_MODES", "PERTURB_TYPES", "AnalysisModel", "CellEmbeddings", "CellStates",
    "GeneEmbeddings", "LayerReader", "PerturbationScan", "PerturbationSettings", "SpecialTokens", "TokenizedCells",
    "benjamini_hochberg", "embed_cells", "embed_genes", "embedding_quality", "length_grouped_batches",
    "load_analysis_model", "parse_cell_states", "parse_filters", "perturb_genes", "perturbation_statistics",
    "resolve_emb_layer", "resolve_token_dictionary", "run_embed", "run_perturb", "truncated_encoder",
    "write_cell_embeddings",
    "write_gene_embeddings",
]
