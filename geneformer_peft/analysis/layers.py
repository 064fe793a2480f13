"""Forward passes that stop at the layer an analysis reads.

Geneformer numbers embedding layers from the end: ``emb_layer = 0`` is the output of the
last layer, ``-1`` the output of the second-to-last layer, and ``-n`` in general the
output after ``num_hidden_layers - n`` layers (``-num_hidden_layers`` is the embedding
output). With the model's own ``output_hidden_states=True`` tuple ``hs`` (embedding output
first), the embedding of ``emb_layer`` is ``hs[num_hidden_layers + emb_layer]``.

:func:`truncated_encoder` builds a *shallow view* of a model's ``BertModel`` whose
``encoder.layer`` holds only the first ``k`` layers (the same module objects: no weight is
copied) and no pooler. Calling it runs the model's own ``forward`` code, so the embeddings,
the gene-token adapter, prefix prompts (inserted, overwritten and removed by the encoder)
and the attention mask are handled exactly as in the full model, and the layers after
``k`` and the heads never run.
"""
from __future__ import annotations

import copy
import logging

import torch
from torch import nn

from geneformer_peft.errors import DataError

__all__ = ["layers_needed", "resolve_emb_layer", "truncated_encoder", "LayerReader"]

logger = logging.getLogger(__name__)


def resolve_emb_layer(emb_layer: int, num_hidden_layers: int) -> int:
    """Index into ``hidden_states`` (= number of layers to run) of Geneformer's ``emb_layer``.

    Parameters
    ----------
    emb_layer : int
        0 for the last layer, -1 for the second-to-last, ... down to ``-num_hidden_layers``
        (the embedding output).
    num_hidden_layers : int
        Layers of the model.

    Returns
    -------
    int
        ``num_hidden_layers + emb_layer``, between 0 and ``num_hidden_layers``.

    Raises
    ------
    DataError
        For a positive ``emb_layer`` or one below ``-num_hidden_layers``.
    """
    emb_layer = int(emb_layer)
    if emb_layer > 0 or emb_layer < -num_hidden_layers:
        raise DataError(f"--emb_layer {emb_layer} is out of range for a model of {num_hidden_layers} layers; "
                        f"expected 0 (last layer), -1 (second-to-last) ... down to {-num_hidden_layers} "
                        "(the embedding output)")
    return num_hidden_layers + emb_layer


def layers_needed(emb_layer: int, num_hidden_layers: int) -> int:
    """Number of encoder layers that must run to read ``emb_layer`` (see :func:`resolve_emb_layer`)."""
    return resolve_emb_layer(emb_layer, num_hidden_layers)


def _base_model(model: nn.Module) -> nn.Module:
    """The ``BertModel`` of a headed model (``model.bert``) or the model itself."""
    return model.bert if hasattr(model, "bert") else model


def _shallow(module: nn.Module) -> nn.Module:
    """A copy of ``module`` sharing its parameters and children but with its own child table,
    so that replacing a child on the copy leaves the original untouched."""
    view = copy.copy(module)
    view._modules = dict(module._modules)  # noqa: SLF001 - the child table of nn.Module
    return view


def truncated_encoder(model: nn.Module, n_layers: int) -> nn.Module:
    """A view of ``model``'s ``BertModel`` that runs only its first ``n_layers`` layers.

    Parameters
    ----------
    model : nn.Module
        A ``BertModel`` or a headed model with a ``.bert`` attribute.
    n_layers : int
        Layers to keep, ``0 <= n_layers <= num_hidden_layers``.

    Returns
    -------
    nn.Module
        Callable as ``view(input_ids, attention_mask).last_hidden_state``, equal to the full
        model's ``hidden_states[n_layers]``. It shares the weights (and their device/dtype)
        with ``model``; the pooler is left out.
    """
    bert = _base_model(model)
    total = len(bert.encoder.layer)
    if not 0 <= n_layers <= total:
        raise ValueError(f"n_layers {n_layers} is out of range; the model has {total} layers")
    encoder = _shallow(bert.encoder)
    encoder.layer = nn.ModuleList(list(bert.encoder.layer)[:n_layers])
    view = _shallow(bert)
    view.encoder = encoder
    view.pooler = None
    return view


class LayerReader:
    """Hidden states of one layer, computed with as few layers as the readout needs.

    Parameters
    ----------
    model : nn.Module
        A headed model (``BertForMaskedLM`` / ``BertForSequenceClassification``) or a ``BertModel``.
    emb_layer : int
        Geneformer's layer index (see :func:`resolve_emb_layer`).
    logits : bool
        Also return the classifier's logits, which need every layer: the layers after the read
        one continue from its hidden states, and the last of them computes token 0 alone (all
        the head reads; see ``BertEncoder.forward``). With prefix prompts (positions the
        continued run would lack) or ``emb_layer`` 0, the full model runs once with
        ``output_hidden_states`` instead.
    """

    def __init__(self, model: nn.Module, emb_layer: int, *, logits: bool = False) -> None:
        bert = _base_model(model)
        self.model = model
        self.num_layers = len(bert.encoder.layer)
        self.layer_index = resolve_emb_layer(emb_layer, self.num_layers)
        self.emb_layer = int(emb_layer)
        self.logits = bool(logits)
        if self.logits and not hasattr(model, "classifier"):
            raise ValueError("logits=True needs a sequence classifier (a model with a .classifier head)")
        prompts = any(layer.prompt_embeddings is not None for layer in bert.encoder.layer)
        # logits: continue from the read layer unless prompts must stay inserted across it
        self._continue = self.logits and not prompts and self.layer_index < self.num_layers
        full = self.logits and not self._continue
        self._view = None if full else truncated_encoder(model, self.layer_index)
        logger.debug("reading hidden_states[%d] of %d layers (%s)", self.layer_index, self.num_layers,
                     "full model for logits" if full else f"{self.layer_index} layers run"
                     + (", then the rest for the logits" if self._continue else ""))

    @property
    def layers_run(self) -> int:
        """Encoder layers each forward runs."""
        return self.num_layers if self.logits else self.layer_index

    @torch.no_grad()
    def __call__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(B, L, d) hidden states of the layer and, with ``logits``, the (B, C) logits."""
        if self._continue:
            hidden = self._view(input_ids, attention_mask).last_hidden_state
            out = self.model(input_ids, attention_mask, inputs_hidden=hidden, start_layer=self.layer_index)
            return hidden, out.logits
        if self.logits:
            out = self.model(input_ids, attention_mask, output_hidden_states=True)
            return out.hidden_states[self.layer_index], out.logits
        return self._view(input_ids, attention_mask).last_hidden_state, None
