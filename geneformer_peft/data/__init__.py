"""Data stage: cell sources, the rank-value encoding (Geneformer's tokenizer), vocabularies,
folds in the reference layout, dataset I/O, collators, samplers and synthetic cells.

Imports neither :mod:`geneformer_peft.training` nor :mod:`geneformer_peft.evaluation`.

Names are loaded on first use (``from geneformer_peft.data import X`` imports only the
module holding ``X``).
"""
from geneformer_peft._lazy import lazy_face

#: public name -> module of this package that defines it
_WHERE = {
    "CellChunk": "cell_source",
    "CellSource": "cell_source",
    "check_raw_counts": "cell_source",
    "iter_cell_chunks": "cell_source",
    "open_cell_source": "cell_source",
    "select_cells": "cell_source",
    "BinnedStats": "binned",
    "GENE2VEC_FILE": "binned",
    "GENE_PANEL_FILE": "binned",
    "PanelAlignment": "binned",
    "align_to_panel": "binned",
    "binned_encode": "binned",
    "read_gene2vec": "binned",
    "read_gene_panel": "binned",
    "tokenize_binned": "binned",
    "write_panel_files": "binned",
    "BinnedMaskingCollator": "binned_collator",
    "stack_binned": "binned_collator",
    "EncodedCells": "cells",
    "collate_cells": "cells",
    "MaskedLMCollator": "collator",
    "pad_input_ids": "collator",
    "load_saved_dataset": "dataset_io",
    "save_dataset_atomically": "dataset_io",
    "SPLITS": "folds",
    "check_fold_files": "folds",
    "discover_folds": "folds",
    "fold_paths": "folds",
    "label_mapping": "folds",
    "load_fold": "folds",
    "split_folds": "folds",
    "rank_value_encode": "rank_value",
    "tokenize_anndata": "rank_value",
    "TokenizationStats": "rank_value",
    "GeneMap": "rank_value",
    "build_gene_map": "rank_value",
    "BalancedLengthGroupedSampler": "samplers",
    "LengthGroupedSampler": "samplers",
    "ShuffledSampler": "samplers",
    "class_weights": "samplers",
    "group_by_length": "samplers",
    "DEFAULT_CELL_TYPES": "synthetic",
    "default_class_proportions": "synthetic",
    "generate_counts": "synthetic",
    "generate_unlabelled_counts": "synthetic",
    "MODEL_VERSIONS": "vocab",
    "check_model_version": "vocab",
    "PAD_TOKEN": "vocab",
    "MASK_TOKEN": "vocab",
    "CLS_TOKEN": "vocab",
    "EOS_TOKEN": "vocab",
    "load_token_dictionary": "vocab",
    "load_gene_median_dictionary": "vocab",
    "save_tokenizer_json": "vocab",
    "build_vocabulary": "vocab",
    "write_dictionaries": "vocab",
    "is_special_token": "vocab",
    "validate_token_dictionary": "vocab",
}

__getattr__, __dir__, __all__ = lazy_face(__name__, _WHERE)
