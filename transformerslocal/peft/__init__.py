"""PEFT methods of scPEFT and more, one module each (lora, prefix, gene_token, encoder_adapter,
ia3, dora; the shared bottleneck in adapter), described by a :class:`~.base.PeftMethod` and
listed in :mod:`.registry`; which parameters train (trainable); PEFT weights on disk and
merging (io); the frozen base stored quantized under them (quantize, ``finetune --quantize``).
Keys, modules and files: ``docs/peft_keys.md``."""
from .base import PeftMethod
from .io import (
    PEFT_WEIGHTS_NAME,
    load_peft_model,
    load_peft_weights,
    merge_lora,
    merge_peft,
    peft_state_dict,
    save_peft_weights,
)
from .registry import PEFT_METHODS, REGISTRY
from .trainable import (
    METHOD_KEYS,
    ParameterReport,
    is_trainable,
    mark_trainable,
    parameter_report,
    trainable_parameter_names,
)

__all__ = [
    "METHOD_KEYS", "PEFT_METHODS", "PEFT_WEIGHTS_NAME", "REGISTRY", "ParameterReport", "PeftMethod", "is_trainable",
    "load_peft_model", "load_peft_weights", "mark_trainable", "merge_lora", "merge_peft", "parameter_report",
    "peft_state_dict", "save_peft_weights", "trainable_parameter_names",
]
