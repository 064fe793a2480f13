"""Settings of one fine-tuning run: the reference's training choices as defaults."""
from __future__ import annotations

from dataclasses import asdict, dataclass

from transformerslocal.peft.quantize import QUANTIZE_SCHEMES

__all__ = ["CLASS_WEIGHTINGS", "EPOCH_SELECTIONS", "LR_SCHEDULES", "PRECISIONS", "QUANTIZE", "SAMPLERS",
           "TrainingArguments"]

LR_SCHEDULES = ("linear", "cosine", "constant")
SAMPLERS = ("balanced", "length", "random")
CLASS_WEIGHTINGS = ("reference", "none")
PRECISIONS = ("fp32", "bf16", "fp16")
#: the validation score that picks the kept epoch (and that early stopping watches)
EPOCH_SELECTIONS = ("macro_f1", "loss")
#: storage of the frozen encoder projections under a PEFT method (``--quantize``)
QUANTIZE = QUANTIZE_SCHEMES


@dataclass
class TrainingArguments:
    """Optimisation settings of a fold (AdamW, linear warmup/decay, the epoch kept and early
    stopping by validation macro-F1 or loss (``select_epoch_by``), class weights (1 - n_c/N)^2,
    class-balanced length-grouped sampling). ``quantize`` stores the frozen encoder projections
    as nf4 or int8 under a PEFT method (``transformerslocal.peft.quantize``).
    """

    epochs: int = 10
    batch_size: int = 32
    eval_batch_size: int | None = None
    lr: float = 5e-4
    weight_decay: float = 0.001
    warmup_steps: int = 0
    warmup_ratio: float = 0.05
    lr_schedule: str = "linear"
    layer_decay: float | None = None
    lr_end: float = 0.0
    early_stopping_patience: int = 5
    select_epoch_by: str = "macro_f1"
    sampler: str = "balanced"
    class_weighting: str = "reference"
    max_length: int | None = None
    num_workers: int = 0
    seed: int = 0
    device: str = "auto"
    precision: str = "fp32"
    quantize: str | None = None
    gradient_checkpointing: bool = False
    cache_frozen_layers: bool = True
    max_grad_norm: float | None = 1.0
    pad_to_multiple_of: int | None = None
    progress: bool = True

    def __post_init__(self) -> None:
        def check(name, ok, expected):
            if not ok:
                raise ValueError(f"training setting {name}={getattr(self, name)!r} is not valid; expected {expected}")

        check("epochs", isinstance(self.epochs, int) and self.epochs >= 1, "an integer >= 1")
        check("batch_size", isinstance(self.batch_size, int) and self.batch_size >= 1, "an integer >= 1")
        check("lr", isinstance(self.lr, (int, float)) and self.lr > 0, "a positive number, e.g. 5e-5")
        check("weight_decay", self.weight_decay >= 0, "a number >= 0")
        check("warmup_steps", self.warmup_steps >= 0, "an integer >= 0")
        check("lr_schedule", self.lr_schedule in LR_SCHEDULES, f"one of {list(LR_SCHEDULES)}")
        check("warmup_ratio", isinstance(self.warmup_ratio, (int, float)) and 0 <= self.warmup_ratio < 1,
              "a number in [0, 1)")
        check("layer_decay", self.layer_decay is None or (isinstance(self.layer_decay, (int, float))
                                                          and 0 < self.layer_decay <= 1),
              "None or a number in (0, 1], e.g. 0.65")
        check("lr_end", isinstance(self.lr_end, (int, float)) and 0 <= self.lr_end < self.lr,
              f"a number >= 0 below --lr {self.lr}, e.g. 1e-10")
        check("early_stopping_patience", self.early_stopping_patience >= 0, "an integer >= 0 (0 switches it off)")
        check("select_epoch_by", self.select_epoch_by in EPOCH_SELECTIONS, f"one of {list(EPOCH_SELECTIONS)}")
        check("sampler", self.sampler in SAMPLERS, f"one of {list(SAMPLERS)}")
        check("class_weighting", self.class_weighting in CLASS_WEIGHTINGS, f"one of {list(CLASS_WEIGHTINGS)}")
        check("max_length", self.max_length is None or self.max_length >= 1, "an integer >= 1")
        check("precision", self.precision in PRECISIONS, f"one of {list(PRECISIONS)}")
        check("quantize", self.quantize is None or self.quantize in QUANTIZE, f"None or one of {list(QUANTIZE)}")
        check("num_workers", self.num_workers >= 0, "an integer >= 0")

    def to_dict(self) -> dict:
        return asdict(self)
