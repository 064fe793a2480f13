"""Geneformer-PEFT, the application: one package per stage, imports running one way.

- :mod:`geneformer_peft.data`: cell sources, rank-value encoding, vocabularies, folds, collators, samplers
- :mod:`geneformer_peft.models`: building and loading classifiers, device and precision
- :mod:`geneformer_peft.evaluation`: inference, metrics, outputs, figures, prediction
- :mod:`geneformer_peft.training`: the fine-tuning loop, cross-validation, pretraining
- :mod:`geneformer_peft.commands` and :mod:`geneformer_peft.cli`: the command line (the only
  place that parses arguments, sets up logging and turns errors into exit codes)
- :mod:`geneformer_peft.api`: the Python API, re-exported here (``import geneformer_peft as gp``;
  ``gp.tokenize``, ``gp.split``, ``gp.finetune``, ``gp.predict``, ``gp.embed``, ``gp.perturb``,
  ``gp.check``), loaded on first use
- :mod:`geneformer_peft.compat`: Geneformer's class names and arguments over the same code

:mod:`geneformer_peft.errors` holds the error classes every stage raises. The models
themselves live in :mod:`transformerslocal`, which never imports this package.
"""
from geneformer_peft._lazy import lazy_face

__getattr__, __dir__, __all__ = lazy_face(__name__, {name: "api" for name in (
    "tokenize", "split", "finetune", "open_run", "FinetuneResult", "FoldResult", "predict", "embed", "perturb",
    "check", "umap")})
