"""Geneformer's class names and argument names over this project's code, for porting scripts.

``from geneformer_peft.compat import TranscriptomeTokenizer, Classifier, EmbExtractor,
InSilicoPerturber, InSilicoPerturberStats`` take the arguments of Geneformer's classes of those
names for what this project does, and refuse every other argument with a message naming it
(docs/geneformer_compat.md lists which map and which do not). Each method calls the Python API
(:mod:`geneformer_peft.api`), so results are those of the commands. ``Classifier`` also takes
the PEFT options (``prompt_type``, ``config``).
"""
from geneformer_peft._lazy import lazy_face

#: public name -> module of this package that defines it
_WHERE = {
    "TranscriptomeTokenizer": "tokenizer",
    "Classifier": "classifier",
    "EmbExtractor": "embeddings",
    "InSilicoPerturber": "perturbation",
    "InSilicoPerturberStats": "perturbation",
    "UnsupportedArgument": "_options",
}

__getattr__, __dir__, __all__ = lazy_face(__name__, _WHERE)
