"""transformerslocal: HuggingFace BERT, written here, that loads Geneformer checkpoints
unchanged and carries PEFT hook points (LoRA, DoRA, IA3, prefix prompts, gene-token and
encoder adapters) switched on by keys in ``config.json`` (``docs/peft_keys.md``)."""
from .configuration_bert import PEFT_METHODS, BertConfig
from .modeling_bert import (
    BertForMaskedLM,
    BertForSequenceClassification,
    BertForTokenClassification,
    BertModel,
)
from .configuration_performer import PerformerConfig
from .modeling_performer import PerformerForMaskedLM, PerformerForSequenceClassification, PerformerModel
from .configuration_cellfm import CellFMConfig
from .modeling_cellfm import CellFMForMaskedValues, CellFMForSequenceClassification, CellFMModel
from .peft import (
    load_peft_model,
    load_peft_weights,
    mark_trainable,
    merge_lora,
    merge_peft,
    parameter_report,
    save_peft_weights,
    trainable_parameter_names,
)
from .peft import io as _peft_io

# peft/ sits below the models and does not import them; the default class of load_peft_model
# is handed down from here, where both are known.
_peft_io.set_default_model_class(BertForSequenceClassification)

__all__ = [
    "PEFT_METHODS", "BertConfig", "BertForMaskedLM", "BertForSequenceClassification", "BertForTokenClassification",
    "BertModel", "CellFMConfig", "CellFMForMaskedValues", "CellFMForSequenceClassification", "CellFMModel",
    "PerformerConfig", "PerformerForMaskedLM", "PerformerForSequenceClassification", "PerformerModel",
    "load_peft_model", "load_peft_weights", "mark_trainable", "merge_lora", "merge_peft",
    "parameter_report", "save_peft_weights", "trainable_parameter_names",
]
