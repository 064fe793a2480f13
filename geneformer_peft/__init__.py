"""Geneformer-PEFT application package: tokenization, folds, training, metrics and outputs."""
