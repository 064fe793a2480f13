"""The model and the vocabulary an analysis runs on.

:func:`load_analysis_model` accepts every checkpoint the project produces or reads:

- a fine-tuned fold folder (full weights with a trained ``classifier``): loaded as a cell
  classifier, so perturbations can also report class-probability changes;
- a fold's PEFT-only weights (``peft_model.safetensors``) with ``base_model``: the base
  checkpoint with the fold's PEFT modules and head applied;
- a pretrained Geneformer checkpoint (no classifier): loaded as ``BertForMaskedLM``; the
  MLM head is never run by the analyses. A pretrained folder whose ``config.json`` names a
  PEFT method (``prompt_type``) but whose weights carry no such tensors is loaded as the
  plain BERT it is (freshly initialised PEFT modules would change the numbers, or, for
  LoRA's zero start, only cost time);
- ``random_init``: the checkpoint's architecture with random weights (a baseline for
  "did pretraining help?").
"""
from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from geneformer_peft.data.vocab import (
    CLS_TOKEN,
    EOS_TOKEN,
    PAD_TOKEN,
    TOKEN_DICTIONARY_FILE,
    TOKEN_DICTIONARY_JSON_FILE,
    TOKENIZER_FILE,
    load_token_dictionary,
)
from geneformer_peft.errors import DataError
from geneformer_peft.models.loading import load_fold_model
from transformerslocal import BertConfig, BertForMaskedLM
from transformerslocal.modeling_utils import find_weights_file

__all__ = ["AnalysisModel", "SpecialTokens", "load_analysis_model", "resolve_token_dictionary"]

logger = logging.getLogger(__name__)

PEFT_WEIGHTS_FILE = "peft_model.safetensors"


@dataclass
class AnalysisModel:
    """A loaded model and what the analyses need to know about it.

    Attributes
    ----------
    model : nn.Module
        ``BertForSequenceClassification`` (kind ``"classifier"``) or ``BertForMaskedLM``.
    kind : str
        ``"classifier"``, ``"pretrained"`` or ``"random"``.
    source : str
        What was loaded (for plot titles and provenance).
    """

    model: nn.Module
    kind: str
    source: str
    base_model: str | None = None

    @property
    def config(self) -> BertConfig:
        return self.model.config

    @property
    def num_layers(self) -> int:
        return int(self.config.num_hidden_layers)

    @property
    def max_input_size(self) -> int:
        """Dataset tokens the model takes per cell (its ``max_position_embeddings``, less the
        positions the model adds itself: CellFM's cls)."""
        from geneformer_peft.models.families import family_of_config

        return family_of_config(self.config).data_length(int(self.config.max_position_embeddings))

    @property
    def is_classifier(self) -> bool:
        return self.kind == "classifier"

    @property
    def class_names(self) -> list[str]:
        """Class names of a classifier's outputs, in logit order (empty for other kinds)."""
        if not self.is_classifier:
            return []
        return [str(self.config.id2label[i]) for i in range(self.config.num_labels)]

    def to(self, device: torch.device) -> AnalysisModel:
        self.model.to(device).eval()
        return self


@dataclass(frozen=True)
class SpecialTokens:
    """Token ids that are not genes: padding, and V2's ``<cls>`` (first) / ``<eos>`` (last).

    A cell's gene tokens are its tokens without padding, without a leading ``<cls>`` and
    without a trailing ``<eos>``.
    """

    pad: int = 0
    cls: int | None = None
    eos: int | None = None
    other: frozenset[int] = field(default_factory=frozenset)

    @classmethod
    def from_dictionary(cls, token_dictionary: Mapping[str, int] | None, *, pad: int = 0) -> SpecialTokens:
        """The special tokens of a Geneformer token dictionary (``None``: padding only, V1)."""
        if token_dictionary is None:
            return cls(pad=pad)
        specials = {int(v) for k, v in token_dictionary.items() if str(k).startswith("<") and str(k).endswith(">")}
        return cls(pad=int(token_dictionary.get(PAD_TOKEN, pad)),
                   cls=int(token_dictionary[CLS_TOKEN]) if CLS_TOKEN in token_dictionary else None,
                   eos=int(token_dictionary[EOS_TOKEN]) if EOS_TOKEN in token_dictionary else None,
                   other=frozenset(specials))

    def gene_span(self, tokens) -> tuple[int, int]:
        """``(start, stop)`` of the gene tokens of one cell's unpadded token array."""
        n = len(tokens)
        start = 1 if self.cls is not None and n and int(tokens[0]) == self.cls else 0
        stop = n - 1 if self.eos is not None and n > start and int(tokens[n - 1]) == self.eos else n
        return start, stop


def _checkpoint_keys(directory: Path) -> list[str]:
    """Tensor names in a checkpoint folder's weights, without loading them when possible."""
    file = find_weights_file(directory)
    if file.name.endswith(".index.json"):
        return list(json.loads(file.read_text(encoding="utf-8"))["weight_map"])
    if file.suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(file), framework="pt") as handle:
            return list(handle.keys())
    return list(torch.load(file, map_location="cpu", weights_only=True))


def _state_keys(config: BertConfig) -> set[str]:
    """State-dict keys of a ``BertForMaskedLM`` under ``config`` (built on the meta device: no memory, no init)."""
    with torch.device("meta"):
        return set(BertForMaskedLM(config).state_dict())


def _load_pretrained(model_path: Path, keys: list[str]) -> BertForMaskedLM:
    config = BertConfig.from_pretrained(model_path)
    if config.peft_methods:
        plain = config.copy(prompt_type="")
        peft_keys = _state_keys(config) - _state_keys(plain)
        normalised = {k if k.startswith(("bert.", "cls.")) else "bert." + k for k in keys}
        if not peft_keys & normalised:
            logger.info("%s: config.json names prompt_type=%r but the weights hold no tensors for it; "
                        "loading the plain pretrained BERT", model_path, config.prompt_type)
            config = plain
    model = BertForMaskedLM.from_pretrained(model_path, config=config)
    missing = [k for k in model.loading_info.get("missing_keys", []) if not k.startswith("cls.")]
    if missing:
        logger.warning("%s: %d backbone tensors are not in the checkpoint and are random: %s",
                       model_path, len(missing), missing[:5])
    return model


def load_analysis_model(model_path: str | Path, base_model: str | Path | None = None, *,
                        random_init: bool = False, seed: int = 0) -> AnalysisModel:
    """Load any checkpoint for embedding extraction or perturbation (see the module docstring).

    Parameters
    ----------
    model_path : path
        Fold folder, PEFT-weights folder (with ``base_model``) or pretrained checkpoint.
    base_model : path, optional
        Base checkpoint under the PEFT-only weights of ``model_path``.
    random_init : bool
        Build ``model_path``'s architecture (plain BERT) with random weights instead.
    seed : int
        Seed of the random weights.

    Raises
    ------
    DataError
        If ``model_path`` is not a folder, or ``base_model`` is given but ``model_path``
        holds no ``peft_model.safetensors``.
    """
    model_path = Path(model_path)
    if not model_path.is_dir():
        raise DataError(f"--model_path {model_path} is not a folder; expected a checkpoint folder "
                        "(config.json and model weights) or a fold folder")
    from geneformer_peft.models.families import FAMILIES, family_of

    family = family_of(model_path)
    if random_init:
        config = family.config_class.from_pretrained(model_path).copy(prompt_type="")
        torch.manual_seed(seed)
        return AnalysisModel(family.masked_lm_class(config).eval(), "random", f"random init ({model_path.name} shape)")
    if base_model is not None:
        if not (model_path / PEFT_WEIGHTS_FILE).is_file():
            raise DataError(f"--base_model given, but {model_path} holds no {PEFT_WEIGHTS_FILE}; expected the folder "
                            "of a fold's PEFT-only weights (or leave out --base_model for a full checkpoint)")
        model = load_fold_model(model_path, base_model)
        return AnalysisModel(model.eval(), "classifier", str(model_path), base_model=str(base_model))
    try:
        keys = _checkpoint_keys(model_path)
    except FileNotFoundError as err:
        if (model_path / PEFT_WEIGHTS_FILE).is_file():
            raise DataError(f"{model_path} holds PEFT-only weights ({PEFT_WEIGHTS_FILE}); pass the checkpoint "
                            "they were trained on as --base_model") from err
        raise DataError(str(err)) from err
    if any(k.startswith("classifier.") for k in keys):
        model = load_fold_model(model_path)
        return AnalysisModel(model.eval(), "classifier", str(model_path))
    if family is not FAMILIES["bert"]:
        return AnalysisModel(family.masked_lm_class.from_pretrained(model_path).eval(), "pretrained", str(model_path))
    return AnalysisModel(_load_pretrained(model_path, keys).eval(), "pretrained", str(model_path))


def resolve_token_dictionary(token_dictionary: str | Path | None, *folders: str | Path | None
                             ) -> tuple[dict[str, int] | None, Path | None]:
    """The token dictionary given, else the first ``token_dictionary.pkl`` (or
    ``token_dictionary.json``, or ``tokenizer.json`` as fold folders hold) found in ``folders``.

    Returns
    -------
    (dict or None, Path or None)
        Gene id -> token id, and the file it came from; ``(None, None)`` when none is found.
    """
    if token_dictionary is not None:
        path = Path(token_dictionary)
        return load_token_dictionary(path), path
    for folder in folders:
        if folder is None:
            continue
        for name in (TOKEN_DICTIONARY_FILE, TOKEN_DICTIONARY_JSON_FILE, TOKENIZER_FILE):
            candidate = Path(folder) / name
            if candidate.is_file():
                return load_token_dictionary(candidate), candidate
    return None, None
