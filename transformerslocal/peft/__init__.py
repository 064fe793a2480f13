"""PEFT methods of scPEFT, one module each: lora, prefix, adapter (Gene_token_prompt and
encoder_prompt); which parameters train (trainable); PEFT weights on disk (io)."""
from .io import PEFT_WEIGHTS_NAME, load_peft_model, load_peft_weights, merge_lora, peft_state_dict, save_peft_weights
from .trainable import (
    METHOD_KEYS,
    ParameterReport,
    is_trainable,
    mark_trainable,
    parameter_report,
    trainable_parameter_names,
)

__all__ = [
    "METHOD_KEYS", "PEFT_WEIGHTS_NAME", "ParameterReport", "is_trainable", "load_peft_model", "load_peft_weights",
    "mark_trainable", "merge_lora", "parameter_report", "peft_state_dict", "save_peft_weights",
    "trainable_parameter_names",
]
