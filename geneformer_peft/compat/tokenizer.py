"""``TranscriptomeTokenizer`` with Geneformer's arguments, over :func:`geneformer_peft.tokenize`."""
from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from geneformer_peft.compat._options import note_unused, refuse, refuse_unless

__all__ = ["TranscriptomeTokenizer"]

_OWNER = "TranscriptomeTokenizer"


class TranscriptomeTokenizer:
    """Rank value encoding of raw counts, under Geneformer's argument names.

    Parameters
    ----------
    custom_attr_name_dict
        ``{obs column: dataset column}``: cell attributes copied into the dataset, renamed.
    nproc
        Accepted; tokenization here reads the file in chunks in one process (logged when not 1).
    chunk_size
        Cells read at a time.
    model_input_size
        Maximum tokens per cell (V1 checkpoints: 2048, V2: 4096).
    special_token
        ``True`` frames each cell with ``<cls>`` ... ``<eos>``, which is ``model_version="V2"``
        here; ``False`` is V1. The two must agree.
    collapse_gene_ids
        ``True`` only: counts of repeated Ensembl ids are summed (logged).
    model_version
        ``"V1"`` or ``"V2"``.
    gene_median_file, token_dictionary_file
        Geneformer's ``gene_median_dictionary.pkl`` and ``token_dictionary.pkl`` (or JSON forms).
        Required: this project ships no Geneformer dictionaries.
    gene_mapping_file
        Refused unless None (Ensembl id remapping is not done here).
    gene_name_id_dictionary
        This project's option (not Geneformer's): a symbol -> Ensembl id map for genes named
        by symbol, passed to :func:`geneformer_peft.tokenize`.
    """

    def __init__(self, custom_attr_name_dict: Mapping[str, str] | None = None, nproc: int = 1, chunk_size: int = 512,
                 model_input_size: int = 2048, special_token: bool = False, collapse_gene_ids: bool = True,
                 model_version: str = "V1", gene_median_file: Any = None, token_dictionary_file: Any = None,
                 gene_mapping_file: Any = None, *, gene_name_id_dictionary: Any = None) -> None:
        refuse_unless(_OWNER, {"collapse_gene_ids": collapse_gene_ids, "gene_mapping_file": gene_mapping_file}, {
            "collapse_gene_ids": ((True,), "repeated gene ids are always summed here"),
            "gene_mapping_file": ((None,), "gene ids are not remapped here; give Ensembl ids in var, or "
                                           "gene_name_id_dictionary= for symbols")})
        if model_version not in ("V1", "V2"):
            refuse(_OWNER, "model_version", model_version, "expected 'V1' or 'V2'")
        if bool(special_token) != (model_version == "V2"):
            refuse(_OWNER, "special_token", special_token,
                   f"here <cls>/<eos> framing is what model_version='V2' means; with model_version={model_version!r} "
                   f"pass special_token={model_version == 'V2'}")
        if token_dictionary_file is None or gene_median_file is None:
            refuse(_OWNER, "token_dictionary_file" if token_dictionary_file is None else "gene_median_file", None,
                   "this project ships no Geneformer dictionaries: pass token_dictionary_file= and gene_median_file= "
                   "(Geneformer's token_dictionary.pkl and gene_median_dictionary.pkl)")
        if custom_attr_name_dict is not None and not isinstance(custom_attr_name_dict, Mapping):
            refuse(_OWNER, "custom_attr_name_dict", custom_attr_name_dict, "expected a dict {obs column: new name}")
        if nproc != 1:
            note_unused(_OWNER, "nproc", nproc, "the file is read in chunks of chunk_size cells in this process")
        self.custom_attr_name_dict = dict(custom_attr_name_dict or {})
        self.chunk_size = int(chunk_size)
        self.model_input_size = int(model_input_size)
        self.model_version = model_version
        self.gene_median_file = gene_median_file
        self.token_dictionary_file = token_dictionary_file
        self.gene_name_id_dictionary = gene_name_id_dictionary

    def tokenize_data(self, data_directory: str | Path, output_directory: str | Path, output_prefix: str,
                      file_format: str = "loom", use_generator: bool = False, *, overwrite: bool = False):
        """Tokenize every ``*.<file_format>`` file of ``data_directory`` (sorted by name) into one
        dataset, saved as ``<output_directory>/<output_prefix>.dataset``.

        Returns
        -------
        datasets.Dataset
            The saved dataset.
        """
        import datasets

        from geneformer_peft.api import tokenize
        from geneformer_peft.commands._common import check_output_path

        if file_format not in ("loom", "h5ad"):
            refuse(_OWNER, "file_format", file_format, "expected 'loom' or 'h5ad'")
        if use_generator:
            note_unused(_OWNER, "use_generator", use_generator, "cells are always read in chunks")
        files = sorted(Path(data_directory).glob(f"*.{file_format}"))
        if not files:
            refuse(_OWNER, "data_directory", str(data_directory), f"it holds no *.{file_format} file")
        output = Path(output_directory) / f"{output_prefix}.dataset"
        check_output_path(output, overwrite=overwrite, flag="output_directory/output_prefix")
        columns = list(self.custom_attr_name_dict)
        parts = [tokenize(path, token_dictionary=self.token_dictionary_file,
                          gene_median_dictionary=self.gene_median_file, keep_columns=columns,
                          model_input_size=self.model_input_size, model_version=self.model_version,
                          chunk_size=self.chunk_size, gene_name_id_dictionary=self.gene_name_id_dictionary)
                 for path in files]
        dataset = parts[0] if len(parts) == 1 else datasets.concatenate_datasets(parts)
        renames = {old: new for old, new in self.custom_attr_name_dict.items() if old != new}
        if renames:
            dataset = dataset.rename_columns(renames)
        from geneformer_peft.data.dataset_io import save_dataset_atomically

        save_dataset_atomically(dataset, output)
        return dataset
