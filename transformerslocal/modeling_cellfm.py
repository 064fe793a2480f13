"""CellFM: gene + value tokens of the expressed genes, a cls token, and a post-norm stack of
linear "retention" attention and a gated feed-forward, written here from the published
description (``docs/cellfm.md``; no code of the release is used).

One model, one file, in reading order: value encoder -> attention -> feed-forward -> layer ->
loading/saving -> CellFMModel -> heads.

Module attribute paths are the released checkpoint's names (after ``gamma`` / ``beta`` ->
``weight`` / ``bias``, :mod:`.convert_cellfm`), so a converted checkpoint loads key for key::

    gene_emb                                   (vocab_size, d)   row 0: padding
    cls_token                                  (1, 1, d)
    value_enc.mask_emb                         (1, 1, d)         stands in for a masked value
    value_enc.value_enc.a                      (1, 1)
    value_enc.value_enc.w1.weight              (slots, 1)
    value_enc.value_enc.w3.weight              (slots, slots)
    value_enc.value_enc.table.weight           (d, slots)
    encoder.N.attn.{q,k,v,u,o}_proj.weight     (d, d)
    encoder.N.ffn.{u,v}_proj.weight            (intermediate_size, d)
    encoder.N.ffn.o_proj.weight                (d, intermediate_size)
    encoder.N.post_norm{1,2}.{weight,bias}     (d,)
    classifier.*                               CellFMForSequenceClassification (ours)
    value_head.*                               CellFMForMaskedValues (ours)

PEFT hook points (empty unless a method of the registry puts something there; ``docs/cellfm.md``):
the eight projections ``encoder.N.attn.{q,k,v,u,o}_proj`` and ``encoder.N.ffn.{u,v,o}_proj``
(:data:`~.configuration_cellfm.LINEAR_PATHS`, named so in ``lora_target_modules`` /
``ia3_target_modules``); ``adapter`` on the embedded sequence, and per layer ``Space_Adapter`` on
the attention output and ``MLP_Adapter`` beside the feed-forward.

No linear of the encoder has a bias. Shapes: B batch, L gene tokens, N = 1 + L positions
(cls first), d hidden size, h heads, e head dim.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from .configuration_cellfm import LINEAR_PATHS, CellFMConfig
from .modeling_outputs import BaseModelOutput, MaskedLMOutput, SequenceClassifierOutput
from .modeling_utils import _layer_pattern, find_weights_file, log_loading_report, read_state_dict, write_state_dict
from .peft.registry import owner_of, peft_linear, peft_module

logger = logging.getLogger(__name__)

__all__ = [
    "CellFMForMaskedValues", "CellFMForSequenceClassification", "CellFMModel", "CellFMPreTrainedModel",
    "mask_values",
]

#: head parameters of the two task models (another head's keys are dropped on load, with a log line)
HEAD_PREFIXES = ("classifier.", "value_head.")


# ----------------------------------------------------------------------------- value encoder
class ValueEncoder(nn.Module):
    """A scalar value -> (d,): ``s = LeakyReLU(w1 x)``; ``s = w3 s + a s``; ``softmax(s)`` over
    the slots; ``table(s)``. (..,) -> (.., d)."""

    def __init__(self, config: CellFMConfig) -> None:
        super().__init__()
        slots = config.value_slots
        self.slope = float(config.leaky_relu_slope)
        self.w1 = nn.Linear(1, slots, bias=False)
        self.w3 = nn.Linear(slots, slots, bias=False)
        self.a = nn.Parameter(torch.zeros(1, 1))
        self.table = nn.Linear(slots, config.hidden_size, bias=False)

    def forward(self, values: torch.Tensor) -> torch.Tensor:
        s = F.leaky_relu(self.w1(values.unsqueeze(-1).to(self.w1.weight.dtype)), self.slope)
        s = self.w3(s) + self.a * s
        return self.table(torch.softmax(s, dim=-1))


class ValueEmbedding(nn.Module):
    """The value encoder and ``mask_emb``, which replaces the value's embedding where masked."""

    def __init__(self, config: CellFMConfig) -> None:
        super().__init__()
        self.value_enc = ValueEncoder(config)
        self.mask_emb = nn.Parameter(torch.zeros(1, 1, config.hidden_size))

    def forward(self, values: torch.Tensor, value_mask: torch.Tensor | None = None) -> torch.Tensor:
        out = self.value_enc(values)  # (B, L, d)
        if value_mask is not None:
            out = torch.where(value_mask.bool().unsqueeze(-1), self.mask_emb.to(out.dtype), out)
        return out


# ----------------------------------------------------------------------------- attention
class RetentionAttention(nn.Module):
    """Linear attention without decay, non-causal; (B, N, d) -> (B, N, d). Per head, e the head dim:

        Q = relu(q x) / sqrt(e);  K = relu(k x) / sqrt(e), 0 at padding;  V = (v x) / sqrt(n_genes)
        O = Q (K^T V);  O = O / max(rms(O), 1e-12);  O = O * silu(u x);  out = o(heads concatenated)

    ``rms(O) = ||O|| / sqrt(e)`` per position and head (a norm without weights). Cost is linear
    in N: ``K^T V`` is (e, e) per head.
    """

    def __init__(self, config: CellFMConfig) -> None:
        super().__init__()
        d = config.hidden_size
        self.heads = config.num_attention_heads
        self.head_dim = config.head_dim
        for name in ("q_proj", "k_proj", "v_proj", "u_proj", "o_proj"):
            setattr(self, name, peft_linear(config, f"attn.{name}", nn.Linear(d, d, bias=False)))

    def _split(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        return x.view(b, n, self.heads, self.head_dim).transpose(1, 2)  # (B, h, N, e)

    def forward(self, x: torch.Tensor, key_mask: torch.Tensor, len_scale: torch.Tensor) -> torch.Tensor:
        """``key_mask`` (B, N, 1): 1 at cls and real genes, 0 at padding; ``len_scale`` (B, 1, 1, 1)."""
        scale = self.head_dim ** -0.5
        q = self._split(F.relu(self.q_proj(x))) * scale
        k = self._split(F.relu(self.k_proj(x)) * key_mask) * scale
        v = self._split(self.v_proj(x)) * len_scale
        o = torch.matmul(q, torch.matmul(k.transpose(-1, -2), v))  # (B, h, N, e)
        rms = o.norm(dim=-1, keepdim=True) * scale
        o = o / rms.clamp_min(1e-12)
        b, _, n, _ = o.shape
        o = o.transpose(1, 2).reshape(b, n, -1) * F.silu(self.u_proj(x))
        return self.o_proj(o)


# ----------------------------------------------------------------------------- feed-forward
class GatedFeedForward(nn.Module):
    """``o(u x * v x)``: a bilinear gated unit without activation; (.., d) -> (.., d)."""

    def __init__(self, config: CellFMConfig) -> None:
        super().__init__()
        d, inner = config.hidden_size, config.intermediate_size
        self.u_proj = peft_linear(config, "ffn.u_proj", nn.Linear(d, inner, bias=False))
        self.v_proj = peft_linear(config, "ffn.v_proj", nn.Linear(d, inner, bias=False))
        self.o_proj = peft_linear(config, "ffn.o_proj", nn.Linear(inner, d, bias=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.o_proj(self.u_proj(x) * self.v_proj(x))


# ----------------------------------------------------------------------------- layer
class CellFMLayer(nn.Module):
    """DeepNorm post-norm, ``alpha = (2 * num_hidden_layers) ** 0.25``:

        a = attn(x);  a = a + Space_Adapter(a)      x = post_norm1(alpha x + a)
        f = ffn(x);   f = f + MLP_Adapter(x)        x = post_norm2(alpha x + f)

    The adapters are ``None`` (absent) unless a PEFT method (``encoder_prompt``) sets them.
    """

    def __init__(self, config: CellFMConfig, layer_index: int = 0) -> None:
        super().__init__()
        self.alpha = config.deepnorm_alpha
        self.attn = RetentionAttention(config)
        self.ffn = GatedFeedForward(config)
        self.post_norm1 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.post_norm2 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.Space_Adapter: nn.Module | None = peft_module("attention_output", config, layer_index)
        self.MLP_Adapter: nn.Module | None = peft_module("ffn_output", config, layer_index)

    def forward(self, x: torch.Tensor, key_mask: torch.Tensor, len_scale: torch.Tensor) -> torch.Tensor:
        a = self.attn(x, key_mask, len_scale)
        if self.Space_Adapter is not None:
            a = a + self.Space_Adapter(a)
        x = self.post_norm1(self.alpha * x + a)
        f = self.ffn(x)
        if self.MLP_Adapter is not None:
            f = f + self.MLP_Adapter(x)
        return self.post_norm2(self.alpha * x + f)


# ----------------------------------------------------------------------------- loading / saving
class CellFMPreTrainedModel(nn.Module):
    """Weight init, ``from_pretrained`` / ``save_pretrained`` in the folder format of the other
    families (``config.json`` + ``model.safetensors``), gradient checkpointing, parameter counts."""

    config_class = CellFMConfig
    base_model_prefix = ""  # heads extend the backbone: the checkpoint's names have no prefix
    head_prefixes: tuple[str, ...] = ()

    def __init__(self, config: CellFMConfig) -> None:
        super().__init__()
        if not isinstance(config, CellFMConfig):
            raise TypeError(f"config must be a CellFMConfig, got {type(config).__name__}")
        self.config = config
        self.loading_info: dict[str, Any] = {}

    @torch.no_grad()
    def init_weights(self) -> None:
        """Random weights: xavier-normal linears, those of the residual branches (v, o, the
        feed-forward) scaled by DeepNorm's ``beta = (8 * num_hidden_layers) ** -0.25``; gene
        embedding xavier-normal with the pad row 0; cls token and ``mask_emb`` N(0, 0.02)."""
        beta = (8 * self.config.num_hidden_layers) ** -0.25
        for layer in self.encoder:
            for path in LINEAR_PATHS:
                gain = 1.0 if path in ("attn.q_proj", "attn.k_proj", "attn.u_proj") else beta
                nn.init.xavier_normal_(layer.get_submodule(path).weight, gain=gain)
        nn.init.xavier_normal_(self.gene_emb)
        self.gene_emb[self.config.pad_token_id].zero_()
        nn.init.normal_(self.cls_token, std=0.02)
        nn.init.normal_(self.value_enc.mask_emb, std=0.02)

    def gradient_checkpointing_enable(self) -> None:
        """Recompute each layer's activations in backward: less memory, more compute."""
        self.gradient_checkpointing = True

    def gradient_checkpointing_disable(self) -> None:
        self.gradient_checkpointing = False

    def num_parameters(self, only_trainable: bool = False) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad or not only_trainable)

    def save_pretrained(self, directory: str | os.PathLike, *, safe_serialization: bool = True,
                        state_dict: dict[str, torch.Tensor] | None = None) -> Path:
        """Write ``config.json`` and ``model.safetensors`` (or ``pytorch_model.bin``), the weights atomically."""
        directory = Path(directory)
        write_state_dict(self.state_dict() if state_dict is None else dict(state_dict), directory,
                         safe_serialization=safe_serialization)
        self.config.copy(architectures=[type(self).__name__]).save_pretrained(directory)
        return directory

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, *, config: CellFMConfig | None = None,
                        ignore_mismatched_sizes: bool = False, **config_overrides: Any):
        """Load a CellFM checkpoint folder (``config.json`` + weights, e.g. from ``convert-cellfm``).

        Parameters
        ----------
        path
            Folder with ``config.json`` (``model_type: "cellfm"``) and ``model.safetensors``.
        config
            A config to use instead of the folder's ``config.json``.
        ignore_mismatched_sizes
            Re-initialise weights whose shape differs (a classifier with another number of
            labels) instead of raising.
        **config_overrides
            Config keys that replace the folder's (``num_labels=5``, ...).
        """
        path = Path(path)
        if not path.is_dir():
            raise FileNotFoundError(f"checkpoint folder {path} does not exist")
        weights = find_weights_file(path)
        if config is None:
            config = CellFMConfig.from_pretrained(path, **config_overrides)
        elif config_overrides:
            config = config.copy(**config_overrides)
        model = cls(config)
        model.load_checkpoint_state(read_state_dict(weights), source=str(weights),
                                    ignore_mismatched_sizes=ignore_mismatched_sizes)
        model.eval()
        return model

    def load_checkpoint_state(self, state: dict[str, torch.Tensor], *, source: str = "state dict",
                              ignore_mismatched_sizes: bool = False, report_missing: bool = True) -> dict[str, Any]:
        """Load ``state`` by name: another head's weights are dropped with a log line, any other key
        without a place in the model is an error, missing keys are reported (logged unless
        ``report_missing`` is false)."""
        own = self.state_dict()
        unexpected = sorted(k for k in state if k not in own)
        other_heads = [k for k in unexpected if k.startswith(HEAD_PREFIXES)]
        unexpected = [k for k in unexpected if k not in other_heads]
        if unexpected:
            raise ValueError(f"{source} holds {len(unexpected)} keys that {type(self).__name__} with this config "
                             f"has no place for: {_layer_pattern(unexpected, layer_word='encoder')}. Does "
                             "config.json (num_hidden_layers) match the checkpoint?")
        mismatched = [(k, tuple(v.shape), tuple(own[k].shape)) for k, v in state.items()
                      if k in own and v.shape != own[k].shape]
        if mismatched and not ignore_mismatched_sizes:
            desc = "; ".join(f"{k}: checkpoint {a}, model {b}" for k, a, b in mismatched)
            raise ValueError(f"{source}: weights of another shape than the model's: {desc}. For a classifier "
                             "with another number of labels pass ignore_mismatched_sizes=True.")
        skip = set(other_heads) | {k for k, _, _ in mismatched}
        result = self.load_state_dict({k: v for k, v in state.items() if k not in skip}, strict=False)
        missing = sorted(k for k in result.missing_keys if k not in skip)
        self.loading_info = {"missing_keys": missing, "unexpected_keys": [], "discarded_head_keys": other_heads,
                             "mismatched_keys": mismatched}
        if report_missing:
            log_loading_report(self, source, self.loading_info, layer_word="encoder", is_surprising=lambda k: (
                not k.startswith(self.head_prefixes) and owner_of(k, self.config.peft_methods) is None))
        return self.loading_info


# ----------------------------------------------------------------------------- CellFMModel
class CellFMModel(CellFMPreTrainedModel):
    """The CellFM encoder: gene ids and their values -> (B, 1 + L, d), the cls token at position 0.

    A gene token is ``gene_emb[id] + value embedding``; no positions. The cls token goes first,
    (``Gene_token_prompt``: ``E' = E + adapter(E)``), the embedded sequence is multiplied by the
    0/1 mask, then the layers run.
    """

    def __init__(self, config: CellFMConfig) -> None:
        super().__init__(config)
        d = config.hidden_size
        self.gene_emb = nn.Parameter(torch.zeros(config.vocab_size, d))
        self.cls_token = nn.Parameter(torch.zeros(1, 1, d))
        self.value_enc = ValueEmbedding(config)
        self.encoder = nn.ModuleList(CellFMLayer(config, i) for i in range(config.num_hidden_layers))
        self.adapter: nn.Module | None = peft_module("embedding_output", config)  # E' = E + adapter(E)
        self.gradient_checkpointing = False
        self.init_weights()
        for module in self.modules():  # PEFT modules start at the base model (zero adapters, B = 0)
            if module is not self and hasattr(module, "reset_peft_parameters"):
                module.reset_peft_parameters()

    def _check_inputs(self, input_ids: torch.Tensor, values: torch.Tensor,
                      attention_mask: torch.Tensor | None, value_mask: torch.Tensor | None) -> torch.Tensor:
        if input_ids.ndim != 2 or values.shape != input_ids.shape:
            raise ValueError(f"input_ids {tuple(input_ids.shape)} and values {tuple(values.shape)}: expected two "
                             "(batch, genes) tensors of the same shape")
        if input_ids.shape[1] > self.config.max_genes:
            raise ValueError(f"{input_ids.shape[1]} gene tokens per cell; the model takes at most max_genes="
                             f"{self.config.max_genes}")
        if input_ids.numel() and (int(input_ids.min()) < 0 or int(input_ids.max()) >= self.config.vocab_size):
            raise ValueError(f"input_ids hold ids in [{int(input_ids.min())}, {int(input_ids.max())}]; expected "
                             f"gene rows in [0, {self.config.vocab_size}) (vocab_size)")
        if attention_mask is None:
            attention_mask = input_ids != self.config.pad_token_id
        elif attention_mask.shape != input_ids.shape:
            raise ValueError(f"attention_mask {tuple(attention_mask.shape)}: expected the shape of input_ids "
                             f"{tuple(input_ids.shape)} (one flag per gene token; the cls token is added here)")
        if value_mask is not None and value_mask.shape != input_ids.shape:
            raise ValueError(f"value_mask {tuple(value_mask.shape)}: expected the shape of input_ids "
                             f"{tuple(input_ids.shape)}")
        return attention_mask

    def forward(self, input_ids: torch.Tensor, values: torch.Tensor, attention_mask: torch.Tensor | None = None,
                value_mask: torch.Tensor | None = None, *, output_hidden_states: bool = False,
                return_dict: bool = True) -> BaseModelOutput:
        """Encode cells.

        Parameters
        ----------
        input_ids
            (B, L) gene rows of ``gene_emb``; 0 is padding.
        values
            (B, L) the log1p expression of each gene token.
        attention_mask
            (B, L) 1 for real genes, 0 for padding; ``None``: ``input_ids != pad_token_id``.
        value_mask
            (B, L) True where a value is masked (``mask_emb`` stands in for its embedding).
        output_hidden_states
            Also return the embedded sequence and each layer's output.

        Returns
        -------
        BaseModelOutput
            ``last_hidden_state`` (B, 1 + L, d), the cls token at position 0. Padded positions'
            states carry no meaning.
        """
        attention_mask = self._check_inputs(input_ids, values, attention_mask, value_mask)
        b = input_ids.shape[0]
        dtype = self.gene_emb.dtype
        tokens = self.gene_emb[input_ids] + self.value_enc(values, value_mask)
        x = torch.cat([self.cls_token.expand(b, 1, -1).to(tokens.dtype), tokens], dim=1)
        if self.adapter is not None:
            x = x + self.adapter(x)
        mask = torch.cat([attention_mask.new_ones(b, 1), attention_mask], dim=1).to(dtype).unsqueeze(-1)  # (B, N, 1)
        x = x * mask
        # 1 / sqrt(number of real genes), the cls not counted; a cell without genes reads 1
        len_scale = torch.rsqrt((mask.sum(dim=1) - 1).clamp_min(1.0)).view(b, 1, 1, 1)
        hidden = [x] if output_hidden_states else None
        for layer in self.encoder:
            if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
                x = checkpoint(layer, x, mask, len_scale, use_reentrant=False)
            else:
                x = layer(x, mask, len_scale)
            if output_hidden_states:
                hidden.append(x)
        return BaseModelOutput(last_hidden_state=x, hidden_states=tuple(hidden) if output_hidden_states else None)


# ----------------------------------------------------------------------------- heads
class ClassificationHead(nn.Module):
    """The cls state -> logits: ``out`` alone (``classifier_head: "linear"``), or ``dense`` -
    ``norm`` (BatchNorm) - LeakyReLU - ``out`` (``"mlp"``, hidden ``classifier_hidden_size``)."""

    def __init__(self, config: CellFMConfig) -> None:
        super().__init__()
        d = config.hidden_size
        self.slope = float(config.leaky_relu_slope)
        if config.classifier_head == "mlp":
            hidden = config.classifier_hidden_size
            self.dense: nn.Linear | None = nn.Linear(d, hidden)
            self.norm: nn.BatchNorm1d | None = nn.BatchNorm1d(hidden)
            self.out = nn.Linear(hidden, config.num_labels)
        else:
            self.dense = self.norm = None
            self.out = nn.Linear(d, config.num_labels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.dense is not None:
            x = F.leaky_relu(self.norm(self.dense(x)), self.slope)
        return self.out(x)


class CellFMForSequenceClassification(CellFMModel):
    """Cell classification from the final state of the cls token (``classifier``)."""

    head_prefixes = ("classifier.",)

    def __init__(self, config: CellFMConfig) -> None:
        super().__init__(config)
        self.num_labels = config.num_labels
        self.classifier = ClassificationHead(config)

    def forward(self, input_ids, values, attention_mask=None, value_mask=None, labels=None, *,
                output_hidden_states: bool = False, return_dict: bool = True) -> SequenceClassifierOutput:
        """As :meth:`CellFMModel.forward`; ``labels`` (B,) class ids give a cross-entropy ``loss``."""
        out = super().forward(input_ids, values, attention_mask, value_mask, output_hidden_states=output_hidden_states)
        logits = self.classifier(out.last_hidden_state[:, 0])
        loss = F.cross_entropy(logits.float(), labels.view(-1)) if labels is not None else None
        return SequenceClassifierOutput(loss=loss, logits=logits, hidden_states=out.hidden_states)


def mask_values(attention_mask: torch.Tensor, ratio: float, *, generator: torch.Generator | None = None
                ) -> torch.Tensor:
    """Pick ``round(ratio * n)`` (at least 1) of the ``n`` real genes of each cell at random.

    Parameters
    ----------
    attention_mask
        (B, L) 1 for real genes, 0 for padding.
    ratio
        The share to mask (CellFM: 0.2).
    generator
        The random generator (on the mask's device), for a reproducible draw.

    Returns
    -------
    torch.Tensor
        (B, L) bool, True where the value is masked; never at padding, none in a cell without genes.
    """
    real = attention_mask.bool()
    n = real.sum(dim=1, keepdim=True)
    k = torch.where(n > 0, (n.float() * ratio).round().clamp_min(1), torch.zeros_like(n, dtype=torch.float))
    scores = torch.rand(real.shape, generator=generator, device=real.device).masked_fill(~real, 2.0)
    ranks = scores.argsort(dim=1).argsort(dim=1)  # 0 = the smallest score of the row
    return (ranks < k) & real


class CellFMForMaskedValues(CellFMModel):
    """Masked-value regression: ``value_head`` (d -> 1) predicts each gene's value from its final
    state; the loss is the mean squared error over the masked genes."""

    head_prefixes = ("value_head.",)

    def __init__(self, config: CellFMConfig) -> None:
        super().__init__(config)
        self.value_head = nn.Linear(config.hidden_size, 1)

    def forward(self, input_ids, values, attention_mask=None, value_mask=None, labels=None, *,
                output_hidden_states: bool = False, return_dict: bool = True) -> MaskedLMOutput:
        """As :meth:`CellFMModel.forward`. ``logits``: (B, L) the predicted values of the gene tokens.
        ``labels`` (B, L): the true values; with them and a ``value_mask`` (draw one with
        :func:`mask_values`), ``loss`` is the squared error averaged over masked real genes."""
        out = super().forward(input_ids, values, attention_mask, value_mask, output_hidden_states=output_hidden_states)
        predicted = self.value_head(out.last_hidden_state[:, 1:]).squeeze(-1)  # (B, L)
        loss = None
        if labels is not None:
            if value_mask is None:
                raise ValueError("labels given without value_mask: the loss is taken over the masked genes; "
                                 "draw a mask with mask_values(attention_mask, config.mask_ratio)")
            picked = value_mask.bool()
            if attention_mask is not None:
                picked = picked & attention_mask.bool()
            if not bool(picked.any()):
                loss = predicted.sum() * 0.0
            else:
                loss = F.mse_loss(predicted[picked].float(), labels[picked].float())
        return MaskedLMOutput(loss=loss, logits=predicted, hidden_states=out.hidden_states)

