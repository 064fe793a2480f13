"""Subcommands of ``geneformer-peft`` (one module each; see :mod:`geneformer_peft.cli`)."""
