"""Models stage: the classifier built from a checkpoint and a method's ``config.json``, a
fine-tuned fold loaded back, and where and in what precision a model runs.

Names are loaded on first use (``from geneformer_peft.models import X`` imports only the
module holding ``X``).
"""
from geneformer_peft._lazy import lazy_face

#: public name -> module of this package that defines it
_WHERE = {
    "autocast": "device",
    "resolve_device": "device",
    "FAMILIES": "families",
    "Family": "families",
    "check_input_lengths": "families",
    "family_of": "families",
    "family_of_config": "families",
    "model_type_of": "families",
    "DEFAULT_CLS_ID": "generation",
    "DEFAULT_EOS_ID": "generation",
    "VERSION_KEY": "generation",
    "check_checkpoint_data": "generation",
    "check_data_version": "generation",
    "cls_token_id": "generation",
    "data_version": "generation",
    "model_version": "generation",
    "SHAPE_KEYS": "loading",
    "check_head_labels": "loading",
    "load_classifier": "loading",
    "load_fold_model": "loading",
    "resolve_config": "loading",
    "remap_checkpoint_vocabulary": "vocabulary",
}

__getattr__, __dir__, __all__ = lazy_face(__name__, _WHERE)
