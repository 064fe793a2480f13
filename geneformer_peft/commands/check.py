"""Check that a model and your data fit together, before any training or analysis.

Prints the compatibility report that finetune, predict, embed, perturb, pretrain and
remap-vocab compute up front (docs/own_data.md says what each check means and how to fix it)
and writes it as JSON (docs/outputs.md). Exit code 0 when compatible, 2 when a check refuses.

The input is a saved dataset, a fold layout folder (<data_path>/<dataset_name>, one report per
fold) or raw counts (.h5ad/.loom), tokenized in memory with the checkpoint's dictionaries.

Example:
  geneformer-peft check --model_path Pretrain_ckpts/geneformer-tiny-example \\
      --input example_py/data/synthetic --output compatibility.json
"""
from __future__ import annotations

import argparse
from pathlib import Path

from geneformer_peft.commands._common import CHECKPOINT, file_path, positive_int

HELP = "compatibility report of a model and a dataset, fold layout or .h5ad (exit 2 when they do not fit)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    p = parser.add_argument
    p("--model_path", required=True, type=CHECKPOINT, help="Checkpoint or fine-tuned fold folder.")
    p("--input", required=True, type=Path,
      help="A saved dataset, a fold layout folder (<data_path>/<dataset_name>) or a .h5ad/.loom of raw counts.")
    p("--output", type=file_path("a JSON file to write"), default=None, help="Write the report as JSON here (default: print only).")
    p("--base_model", type=CHECKPOINT, default=None, help="Base checkpoint of a fold's peft_model.safetensors.")
    p("--token_dictionary", type=Path, default=None,
      help="The data's token dictionary: Geneformer .pkl, tokenizer.json or a plain .json {token: id} "
           "(default: the checkpoint's tokenizer.json).")
    p("--gene_median_dictionary", type=file_path("a gene median dictionary file (.json or .pkl)"), default=None,
      help="Raw counts: gene median dictionary, .pkl or a plain .json {gene: median} (default: the checkpoint "
           "folder's gene_median_dictionary.pkl).")
    p("--gene_id_column", default=None, help="Raw counts: var column of gene ids (default: as tokenize).")
    p("--gene_name_id_dictionary", type=file_path("a symbol -> Ensembl id map (.pkl, .csv or .tsv)"), default=None,
      help="Raw counts named by gene symbols: symbol -> Ensembl id map (as tokenize).")
    p("--label_column", default=None, help="Check this label column (fold layouts: cell_type by default).")
    p("--max_length", type=positive_int, default=None, help="Tokens the model reads per cell (default: the model's).")
    p("--allow_low_gene_overlap", action="store_true", help="Report low gene overlap as a warning, not a refusal.")
    p("--allow_other_base", action="store_true", help="Report another --base_model as allowed, not a refusal.")
    p("--overwrite", action="store_true", help="Replace an existing --output.")


def run(args: argparse.Namespace) -> int:
    from geneformer_peft.checks.inputs import check_input

    options = dict(base_model=args.base_model, token_dictionary=args.token_dictionary,
                   gene_median_dictionary=args.gene_median_dictionary, gene_id_column=args.gene_id_column,
                   gene_name_id_dictionary=args.gene_name_id_dictionary, label_column=args.label_column,
                   max_length=args.max_length, allow_low_gene_overlap=args.allow_low_gene_overlap,
                   allow_other_base=args.allow_other_base)
    if args.output is None:
        reports = check_input(args.model_path, args.input, **options)
    else:  # the report is written whether or not the pair fits: that is what it is for
        from geneformer_peft.commands._common import guarded

        with guarded(args, "check", inputs=("input", "model_path", "base_model", "token_dictionary",
                                            "gene_median_dictionary", "gene_name_id_dictionary"),
                     directory=False) as tmp:
            reports = check_input(args.model_path, args.input, output=tmp, **options)
    for name, report in reports.items():
        print((f"[{name}] " if len(reports) > 1 else "") + report.text())
    if args.output is not None:
        print(f"report -> {args.output}")
    refused = [(name, f) for name, report in reports.items() for f in report.refusals]
    if refused:
        from geneformer_peft.checks import IncompatibleData

        raise IncompatibleData(f"--model_path {args.model_path} and --input {args.input} do not fit together:\n  "
                               + "\n  ".join(f"{name}: {f.check}: {f.message}" for name, f in refused))
    return 0
