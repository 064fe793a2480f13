"""transformerslocal: HuggingFace BERT, written here, that loads Geneformer checkpoints
unchanged and carries the scPEFT hooks (LoRA, prefix prompts, gene-token and encoder
adapters) switched on by keys in ``config.json``."""
from .configuration_bert import PEFT_METHODS, BertConfig
from .modeling_bert import (
    BertForMaskedLM,
    BertForSequenceClassification,
    BertForTokenClassification,
    BertModel,
)
from .peft import (
    load_peft_model,
    load_peft_weights,
    mark_trainable,
    merge_lora,
    parameter_report,
    save_peft_weights,
    trainable_parameter_names,
)

__all__ = [
    "PEFT_METHODS", "BertConfig", "BertForMaskedLM", "BertForSequenceClassification", "BertForTokenClassification",
    "BertModel", "load_peft_model", "load_peft_weights", "mark_trainable", "merge_lora", "parameter_report",
    "save_peft_weights", "trainable_parameter_names",
]
