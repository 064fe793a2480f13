"""scBERT: a Performer (FAVOR+ linear attention) over binned expression, written here.

One model, one file, in reading order: random features -> FAVOR+ kernel -> attention ->
feed-forward -> layer -> encoder (with feature redraw) -> embeddings -> loading/saving ->
PerformerModel -> heads -> performer-pytorch state-dict names.

Module attribute paths are the released checkpoint's (performer-pytorch's ``PerformerLM``
names), so ``model_state_dict`` of ``panglao_pretrain.pth`` loads key for key::

    token_emb.weight                                    (num_tokens, dim)
    pos_emb.emb.weight                                  (max_seq_len, dim)   gene2vec, frozen (a buffer)
    performer.net.layers.N.0.norm.{weight,bias}         pre-attention LayerNorm
    performer.net.layers.N.0.fn.to_{q,k,v}.weight       (heads * dim_head, dim)
    performer.net.layers.N.0.fn.to_out.{weight,bias}    (dim, heads * dim_head)
    performer.net.layers.N.0.fn.fast_attention.projection_matrix   (nb_features, dim_head), a buffer
    performer.net.layers.N.1.norm.{weight,bias}         pre-feed-forward LayerNorm
    performer.net.layers.N.1.fn.fn.w{1,2}.{weight,bias} feed-forward
    performer.calls_since_last_redraw                   training forward calls since the last redraw
    norm.{weight,bias}                                  final LayerNorm
    to_out.{weight,bias}                                PerformerForMaskedLM: (num_tokens, dim)
    to_out.{conv1,fc1,fc2,fc3}.*                        PerformerForSequenceClassification (scBERT's head)

performer-pytorch 1.1.4 names the counter ``performer.proj_updater.calls_since_last_redraw`` and
repeats every ``performer.net.*`` tensor under ``performer.proj_updater.instance.*``;
:func:`from_performer_pytorch_state_dict` / :func:`to_performer_pytorch_state_dict` convert.

PEFT hook points (empty unless another module puts something there; see ``docs/scbert.md``):

- linear projections, by path inside ``performer.net.layers.N`` (:data:`LINEAR_PATHS`):
  ``0.fn.to_q``, ``0.fn.to_k``, ``0.fn.to_v``, ``0.fn.to_out``, ``1.fn.fn.w1``, ``1.fn.fn.w2``
  (called as modules, so a replacement keeping ``weight`` / ``bias`` works);
- modules (:data:`MODULE_POINTS`): ``adapter`` on the embedding output, and per layer
  ``Space_Adapter`` on the attention output and ``MLP_Adapter`` beside the feed-forward.

Shapes: B batch, L positions (genes + 1), d dim, h heads, e dim_head, m nb_features.
"""
from __future__ import annotations

import logging
import math
import os
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from .configuration_performer import PerformerConfig
from .dropout import Dropout
from .modeling_outputs import BaseModelOutput, MaskedLMOutput, SequenceClassifierOutput
from .modeling_utils import _layer_pattern as layer_pattern
from .modeling_utils import (
    find_weights_file,
    log_loading_report,
    read_state_dict,
    write_state_dict,
)
from .peft.registry import owner_of, peft_linear, peft_module

logger = logging.getLogger(__name__)

__all__ = [
    "LINEAR_PATHS", "MODULE_POINTS", "PerformerForMaskedLM", "PerformerForSequenceClassification",
    "PerformerModel", "PerformerPreTrainedModel", "from_performer_pytorch_state_dict",
    "gaussian_orthogonal_random_matrix", "to_performer_pytorch_state_dict",
]

#: Linear projections a PEFT method may replace, by path inside ``performer.net.layers.N``.
LINEAR_PATHS = ("0.fn.to_q", "0.fn.to_k", "0.fn.to_v", "0.fn.to_out", "1.fn.fn.w1", "1.fn.fn.w2")
#: The registry's name (a BERT path inside ``encoder.layer.N``, ``peft/base.py`` LINEAR_PATHS) of
#: each Performer projection: the family's name map, so ``lora_target_modules: ["query", "value"]``
#: selects ``to_q`` / ``to_v`` and ``ia3``'s ``"output.dense"`` selects ``to_out`` and ``w2``.
REGISTRY_PATHS = {
    "0.fn.to_q": "attention.self.query",
    "0.fn.to_k": "attention.self.key",
    "0.fn.to_v": "attention.self.value",
    "0.fn.to_out": "attention.output.dense",
    "1.fn.fn.w1": "intermediate.dense",
    "1.fn.fn.w2": "output.dense",
}
#: Points where a module may be added -> its attribute and what the model does with it.
MODULE_POINTS = {
    "embedding_output": "adapter: E' = E + module(E), E = dropout(token_emb + pos_emb)",
    "attention_output": "performer.net.layers.N.Space_Adapter: a = a + module(a) before x = x + a",
    "ffn_output": "performer.net.layers.N.MLP_Adapter: f = f + module(n) before x = x + f, n = norm(x) (the FF input)",
}


# ----------------------------------------------------------------------------- random features
def gaussian_orthogonal_random_matrix(nb_rows: int, nb_columns: int, scaling: int = 0) -> torch.Tensor:
    """FAVOR+'s projection: ``nb_rows`` random features of dimension ``nb_columns`` (m, e).

    Blocks of ``nb_columns`` orthonormal rows (Q of the QR decomposition of a Gaussian
    square matrix, transposed; the last block cut to the rows left), each row then scaled
    by the norm of a Gaussian vector (``scaling=0``) or by ``sqrt(nb_columns)``
    (``scaling=1``). Draws from torch's default CPU generator in the order performer-pytorch
    does (one square block after another, then the norms), so a seeded redraw on CPU gives
    the same matrix as performer-pytorch's.
    """
    blocks = []
    for start in range(0, nb_rows, nb_columns):
        square = torch.randn(nb_columns, nb_columns)
        q, _ = torch.linalg.qr(square, mode="reduced")
        blocks.append(q.t()[: nb_rows - start])
    rows = torch.cat(blocks)  # (m, e), orthonormal within each block
    if scaling == 0:
        norms = torch.randn(nb_rows, nb_columns).norm(dim=1)
    elif scaling == 1:
        norms = torch.full((nb_rows,), math.sqrt(float(nb_columns)))
    else:
        raise ValueError(f"scaling {scaling!r} is not valid; expected 0 or 1")
    return torch.diag(norms) @ rows


# ----------------------------------------------------------------------------- FAVOR+ kernel
class _SoftmaxFeatures(torch.autograd.Function):
    """phi(x) = exp(c x P^T - c^2 |x|^2 / 2 - stabiliser) + eps, the positive random features of
    the softmax kernel, c = e^-1/4, without performer-pytorch's factor m^-1/2 (it cancels in
    the attention's ratio).

    Written as one autograd node: the forward fills one (..., m) tensor in place and saves
    only it and x; the backward recomputes from them. With u = phi - eps and g the incoming
    gradient: dL/dx = c [ (g u) P - (sum_m g u) c x ]. The stabiliser (a maximum, detached
    as in performer-pytorch) is a constant. Low-precision inputs (bf16 autocast) are
    computed in float32 and returned in their own dtype.
    """

    @staticmethod
    def forward(ctx, x, projection, max_dims, eps):
        dtype = x.dtype
        c = x.shape[-1] ** -0.25
        with torch.autocast(device_type=x.device.type, enabled=False):
            xf = x.float()
            scaled_proj = projection.float() * c
            features = torch.matmul(xf, scaled_proj.t())  # (..., m) = c x P^T
            half_sq_norm = xf.pow(2).sum(-1, keepdim=True).mul_(c * c / 2)  # (..., 1)
            stabiliser = features.amax(dim=max_dims, keepdim=True)
            features.sub_(half_sq_norm).sub_(stabiliser).exp_().add_(eps)
            out = features.to(dtype)
        ctx.save_for_backward(x, out, scaled_proj)
        ctx.c, ctx.eps = c, eps
        return out

    @staticmethod
    def backward(ctx, grad):
        x, out, scaled_proj = ctx.saved_tensors
        with torch.autocast(device_type=x.device.type, enabled=False):
            gu = out.float() - ctx.eps  # u = exp(...)
            gu.mul_(grad.float())
            grad_x = torch.matmul(gu, scaled_proj)  # (g u) (c P)
            grad_x.sub_(gu.sum(-1, keepdim=True) * (ctx.c * ctx.c) * x.float())
        return grad_x.to(x.dtype), None, None, None


def softmax_kernel_features(x: torch.Tensor, projection: torch.Tensor, *, max_dims: tuple[int, ...],
                            eps: float = 1e-4) -> torch.Tensor:
    """Random features of ``x`` (B, h, L, e) -> (B, h, L, m); ``max_dims``: the dimensions the
    exponent's maximum is taken over (queries: ``(-1,)``, keys: see :class:`FavorAttention`)."""
    return _SoftmaxFeatures.apply(x, projection, max_dims, eps)


class FavorAttention(nn.Module):
    """Non-causal FAVOR+ attention with the softmax kernel: out = D^-1 phi(q) (phi(k)^T v),
    D = phi(q) sum_L phi(k). The projection (m, e) is a buffer, redrawn by the encoder."""

    def __init__(self, config: PerformerConfig) -> None:
        super().__init__()
        self.nb_features = config.nb_features
        self.dim_head = config.dim_head
        self.ortho_scaling = config.ortho_scaling
        self.eps = float(config.kernel_eps)
        # keys: the maximum per cell and head (performer-pytorch 1.1.4) or per cell (the release)
        self.key_max_dims = (-2, -1) if config.key_stabilizer == "head" else (1, 2, 3)
        self.register_buffer("projection_matrix", gaussian_orthogonal_random_matrix(
            self.nb_features, self.dim_head, self.ortho_scaling))

    @torch.no_grad()
    def redraw_projection_matrix(self) -> None:
        new = gaussian_orthogonal_random_matrix(self.nb_features, self.dim_head, self.ortho_scaling)
        self.projection_matrix.copy_(new)

    def forward(self, q, k, v):
        """(B, h, L, e) each -> (B, h, L, e)."""
        e = v.shape[-1]
        q = softmax_kernel_features(q, self.projection_matrix, max_dims=(-1,), eps=self.eps)  # (B, h, L, m)
        k = softmax_kernel_features(k, self.projection_matrix, max_dims=self.key_max_dims, eps=self.eps)
        context = torch.matmul(k.transpose(-1, -2), v)  # (B, h, m, e)
        k_sum = k.sum(dim=-2).unsqueeze(-1).to(context.dtype)  # (B, h, m, 1)
        numerator, denominator = torch.matmul(q, torch.cat([context, k_sum], dim=-1)).split([e, 1], dim=-1)
        return numerator / denominator  # (B, h, L, e) / (B, h, L, 1)


# ----------------------------------------------------------------------------- attention
class SelfAttention(nn.Module):
    """to_q / to_k / to_v -> FAVOR+ per head -> to_out -> dropout; (B, L, d) -> (B, L, d)."""

    def __init__(self, config: PerformerConfig) -> None:
        super().__init__()
        self.heads = config.heads
        self.fast_attention = FavorAttention(config)
        d, inner = config.dim, config.inner_dim
        for name in ("to_q", "to_k", "to_v"):
            setattr(self, name, peft_linear(config, REGISTRY_PATHS[f"0.fn.{name}"],
                                            nn.Linear(d, inner, bias=config.qkv_bias)))
        self.to_out = peft_linear(config, REGISTRY_PATHS["0.fn.to_out"],
                                  nn.Linear(inner, d, bias=config.attn_out_bias))
        self.dropout = Dropout(config.attn_dropout)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        return x.view(b, n, self.heads, -1).transpose(1, 2)  # (B, h, L, e)

    def forward(self, x):
        q, k, v = self._heads(self.to_q(x)), self._heads(self.to_k(x)), self._heads(self.to_v(x))
        out = self.fast_attention(q, k, v)  # (B, h, L, e)
        b, _, n, _ = out.shape
        out = out.transpose(1, 2).reshape(b, n, -1)  # (B, L, h * e)
        return self.dropout(self.to_out(out))


# ----------------------------------------------------------------------------- feed-forward
class FeedForward(nn.Module):
    """w1 -> GELU -> dropout -> w2; (.., d) -> (.., d)."""

    def __init__(self, config: PerformerConfig) -> None:
        super().__init__()
        self.w1 = peft_linear(config, REGISTRY_PATHS["1.fn.fn.w1"], nn.Linear(config.dim, config.dim * config.ff_mult))
        self.act = nn.GELU()
        self.dropout = Dropout(config.ff_dropout)
        self.w2 = peft_linear(config, REGISTRY_PATHS["1.fn.fn.w2"], nn.Linear(config.dim * config.ff_mult, config.dim))

    def forward(self, x):
        return self.w2(self.dropout(self.act(self.w1(x))))


class Chunked(nn.Module):
    """Run ``fn`` over ``chunks`` slices of the positions (performer-pytorch's ``ff_chunks``):
    the same numbers, a smaller (B, L, d * ff_mult) intermediate."""

    def __init__(self, chunks: int, fn: nn.Module) -> None:
        super().__init__()
        self.chunks = chunks
        self.fn = fn

    def forward(self, x):
        if self.chunks == 1:
            return self.fn(x)
        return torch.cat([self.fn(part) for part in x.chunk(self.chunks, dim=1)], dim=1)


# ----------------------------------------------------------------------------- layer
class PreNorm(nn.Module):
    """A LayerNorm and the block it feeds (``norm``, ``fn``); the layer applies both."""

    def __init__(self, config: PerformerConfig, fn: nn.Module) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(config.dim, eps=config.layer_norm_eps)
        self.fn = fn


class PerformerLayer(nn.Module):
    """Two blocks named ``0`` (attention) and ``1`` (feed-forward), as in the checkpoint:

        a = attn(norm0(x));  a = a + Space_Adapter(a)          x = x + a
        n = norm1(x);  f = ff(n);  f = f + MLP_Adapter(n)      x = x + f

    The adapters are ``None`` (absent) unless a PEFT method sets them.
    """

    def __init__(self, config: PerformerConfig, layer_index: int = 0) -> None:
        super().__init__()
        self.add_module("0", PreNorm(config, SelfAttention(config)))
        self.add_module("1", PreNorm(config, Chunked(config.ff_chunks, FeedForward(config))))
        self.Space_Adapter: nn.Module | None = peft_module("attention_output", config, layer_index)
        self.MLP_Adapter: nn.Module | None = peft_module("ffn_output", config, layer_index)

    def __getitem__(self, index: int) -> PreNorm:
        return self._modules[str(index)]

    @property
    def attention(self) -> SelfAttention:
        return self[0].fn

    @property
    def feed_forward(self) -> FeedForward:
        return self[1].fn.fn

    def forward(self, x):  # (B, L, d) -> (B, L, d)
        attn, ff = self[0], self[1]
        a = attn.fn(attn.norm(x))
        if self.Space_Adapter is not None:
            a = a + self.Space_Adapter(a)
        x = x + a
        n = ff.norm(x)
        f = ff.fn(n)
        if self.MLP_Adapter is not None:
            f = f + self.MLP_Adapter(n)
        return x + f


# ----------------------------------------------------------------------------- encoder
class LayerStack(nn.Module):
    """The layers (``layers``), run in order, each optionally under gradient checkpointing."""

    def __init__(self, config: PerformerConfig) -> None:
        super().__init__()
        self.layers = nn.ModuleList(PerformerLayer(config, i) for i in range(config.depth))
        self.gradient_checkpointing = False

    def forward(self, x, output_hidden_states: bool = False):
        hidden = [x] if output_hidden_states else None
        for layer in self.layers:
            if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
                x = checkpoint(layer, x, use_reentrant=False)
            else:
                x = layer(x)
            if output_hidden_states:
                hidden.append(x)
        return x, hidden


class PerformerEncoder(nn.Module):
    """The layer stack and the feature-redraw schedule of performer-pytorch.

    Each forward call in training mode first checks the counter: once it has reached
    ``feature_redraw_interval``, every layer's projection is redrawn and the counter reset;
    otherwise the counter goes up by one. Evaluation mode never redraws (nor counts), so a
    loaded checkpoint in ``eval()`` computes with its stored projections.
    """

    def __init__(self, config: PerformerConfig) -> None:
        super().__init__()
        self.net = LayerStack(config)
        self.feature_redraw_interval = config.feature_redraw_interval
        self.register_buffer("calls_since_last_redraw", torch.tensor(0))

    def fix_projection_matrices_(self) -> None:
        """Never redraw again (performer-pytorch's ``fix_projection_matrices_``)."""
        self.feature_redraw_interval = None

    def redraw_projections(self) -> None:
        for layer in self.net.layers:
            layer.attention.fast_attention.redraw_projection_matrix()

    def check_redraw_projections(self) -> None:
        if not self.training or self.feature_redraw_interval is None:
            return
        if self.calls_since_last_redraw >= self.feature_redraw_interval:
            self.redraw_projections()
            self.calls_since_last_redraw.zero_()
        else:
            self.calls_since_last_redraw += 1

    def forward(self, x, output_hidden_states: bool = False):
        self.check_redraw_projections()
        return self.net(x, output_hidden_states)


# ----------------------------------------------------------------------------- embeddings
class FrozenTable(nn.Module):
    """A (rows, d) table held as a buffer ``weight``: saved and loaded, never trained."""

    def __init__(self, rows: int, dim: int) -> None:
        super().__init__()
        self.register_buffer("weight", torch.zeros(rows, dim))


class GenePositionEmbedding(nn.Module):
    """Position i is gene i of the panel: row i of ``emb`` is its gene2vec vector; the last
    row (the extra position) is zero. Frozen, as scBERT's (``nn.Embedding.from_pretrained``)."""

    def __init__(self, config: PerformerConfig) -> None:
        super().__init__()
        self.emb = FrozenTable(config.max_seq_len, config.dim)

    @torch.no_grad()
    def set_gene_vectors(self, vectors: torch.Tensor) -> None:
        """Rows 0..gene_num-1 = ``vectors`` (gene_num, d), the last row 0."""
        rows, dim = self.emb.weight.shape
        if tuple(vectors.shape) != (rows - 1, dim):
            raise ValueError(f"gene vectors have shape {tuple(vectors.shape)}; expected ({rows - 1}, {dim}) "
                             f"(gene_num = max_seq_len - 1 rows of dim columns)")
        self.emb.weight[:-1].copy_(vectors)
        self.emb.weight[-1].zero_()

    def forward(self, n: int) -> torch.Tensor:
        return self.emb.weight[:n]  # (L, d)


def fixed_random_gene_vectors(config: PerformerConfig) -> torch.Tensor:
    """(gene_num, d) standard normal vectors from ``pos_embedding_seed`` (the same on every machine)."""
    generator = torch.Generator().manual_seed(int(config.pos_embedding_seed))
    return torch.randn(config.gene_num, config.dim, generator=generator)


def _as_gene_vectors(gene2vec: Any) -> torch.Tensor:
    if isinstance(gene2vec, (str, os.PathLike)):
        gene2vec = np.load(gene2vec, allow_pickle=False)
    tensor = torch.as_tensor(np.asarray(gene2vec) if not torch.is_tensor(gene2vec) else gene2vec)
    if tensor.ndim != 2 or not tensor.is_floating_point():
        raise ValueError(f"gene2vec vectors: got a {tensor.dtype} array of shape {tuple(tensor.shape)}; "
                         "expected a 2-d float array (genes x dim)")
    return tensor.float()


# ----------------------------------------------------------------------------- loading / saving
_MLM_HEAD = re.compile(r"^to_out\.(weight|bias)$")
_CLASSIFIER_HEAD = re.compile(r"^to_out\.(conv1|fc1|fc2|fc3)\.")


def _is_head_key(key: str) -> bool:
    return bool(_MLM_HEAD.match(key) or _CLASSIFIER_HEAD.match(key))


def _layer_pattern(keys) -> list[str]:
    """``performer.net.layers.0.x``, ``...layers.1.x`` -> ``performer.net.layers.{0,1}.x``."""
    return layer_pattern(keys, layer_word="layers")


class PerformerPreTrainedModel(nn.Module):
    """``from_pretrained`` / ``save_pretrained`` in the BERT family's folder format
    (``config.json`` + ``model.safetensors``), gradient checkpointing, parameter counts."""

    config_class = PerformerConfig
    base_model_prefix = ""  # heads extend the backbone: the checkpoint's names have no prefix
    head_prefixes: tuple[str, ...] = ()

    def __init__(self, config: PerformerConfig) -> None:
        super().__init__()
        if not isinstance(config, PerformerConfig):
            raise TypeError(f"config must be a PerformerConfig, got {type(config).__name__}")
        self.config = config
        self.loading_info: dict[str, Any] = {}

    def gradient_checkpointing_enable(self) -> None:
        """Recompute each layer's activations in backward: far less memory, ~1/3 more compute."""
        self.performer.net.gradient_checkpointing = True

    def gradient_checkpointing_disable(self) -> None:
        self.performer.net.gradient_checkpointing = False

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
    def from_pretrained(cls, path: str | os.PathLike, *, config: PerformerConfig | None = None,
                        ignore_mismatched_sizes: bool = False, **config_overrides: Any):
        """Load a scBERT checkpoint folder (``config.json`` + weights).

        Parameters
        ----------
        path
            Folder with ``config.json`` (``model_type: "scbert"``) and ``model.safetensors``
            or ``pytorch_model.bin`` (performer-pytorch 1.1.4 names are accepted too).
        config
            A config to use instead of the folder's ``config.json``.
        ignore_mismatched_sizes
            Re-initialise weights whose shape differs (a classifier head with another number
            of labels) instead of raising.
        **config_overrides
            Config keys that replace the folder's (``num_labels=5``, ...).
        """
        path = Path(path)
        if not path.is_dir():
            raise FileNotFoundError(f"checkpoint folder {path} does not exist")
        weights = find_weights_file(path)
        if config is None:
            config = PerformerConfig.from_pretrained(path, **config_overrides)
        elif config_overrides:
            config = config.copy(**config_overrides)
        model = cls(config, warn_random_positions=False)
        model.load_checkpoint_state(read_state_dict(weights), source=str(weights),
                                    ignore_mismatched_sizes=ignore_mismatched_sizes)
        model.eval()
        return model

    def load_checkpoint_state(self, state: dict[str, torch.Tensor], *, source: str = "state dict",
                              ignore_mismatched_sizes: bool = False, report_missing: bool = True) -> dict[str, Any]:
        """Load ``state`` by name; another head's weights are dropped with a log line, any other
        key without a place in the model is an error, missing keys are reported (logged unless
        ``report_missing`` is false)."""
        state = from_performer_pytorch_state_dict(state, source=source)
        own = self.state_dict()
        unexpected = sorted(k for k in state if k not in own)
        other_heads = [k for k in unexpected if _is_head_key(k)]
        unexpected = [k for k in unexpected if k not in other_heads]
        if unexpected:
            raise ValueError(f"{source} holds {len(unexpected)} keys that {type(self).__name__} with this config "
                             f"has no place for: {_layer_pattern(unexpected)}. Does config.json (depth, "
                             "pos_embedding) match the checkpoint?")
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
        if "pos_emb.emb.weight" in missing:
            logger.warning("%s holds no positional embedding (pos_emb.emb.weight); using a fixed random one "
                           "(pos_embedding_seed=%d)", source, self.config.pos_embedding_seed)
            self.pos_emb.set_gene_vectors(fixed_random_gene_vectors(self.config))
        if report_missing:
            self._report_loading(source)
        return self.loading_info

    def _report_loading(self, source: str) -> None:
        log_loading_report(self, source, self.loading_info, layer_word="layers", is_surprising=lambda k: (
            not k.startswith(self.head_prefixes) and owner_of(k, self.config.peft_methods) is None))


# ----------------------------------------------------------------------------- PerformerModel
def check_no_padding(attention_mask: torch.Tensor | None) -> None:
    """A Performer row has every panel position (no padding): ``attention_mask`` must be
    ``None`` or all ones."""
    if attention_mask is not None and not bool((attention_mask != 0).all()):
        raise ValueError("attention_mask has zeros (padding); a scBERT row holds every panel position "
                         "(gene_num + 1 tokens, no padding), so pass all ones or None")


class PerformerModel(PerformerPreTrainedModel):
    """The scBERT backbone: (B, L) expression tokens -> (B, L, d) after the final LayerNorm.

    Parameters
    ----------
    config
        The model's sizes and settings.
    gene2vec
        Gene vectors (gene_num, d) for the positional embedding (array, tensor or ``.npy``
        path), in the panel's order. When ``None`` and ``config.pos_embedding`` is
        ``"gene2vec"``, a fixed random embedding (``pos_embedding_seed``) is used and a warning
        logged (``from_pretrained`` loads the checkpoint's and does not warn).
    warn_random_positions
        Log the warning above (``from_pretrained`` passes ``False``).
    """

    def __init__(self, config: PerformerConfig, *, gene2vec: Any = None, warn_random_positions: bool = True) -> None:
        super().__init__(config)
        self.token_emb = nn.Embedding(config.num_tokens, config.dim)
        self.pos_emb = GenePositionEmbedding(config) if config.pos_embedding == "gene2vec" else None
        self.dropout = Dropout(config.emb_dropout)
        self.performer = PerformerEncoder(config)
        self.norm = nn.LayerNorm(config.dim, eps=config.layer_norm_eps)
        self.adapter: nn.Module | None = peft_module("embedding_output", config)  # E' = E + adapter(E)
        if self.pos_emb is not None:
            if gene2vec is not None:
                self.pos_emb.set_gene_vectors(_as_gene_vectors(gene2vec))
            else:
                if warn_random_positions:
                    logger.warning("no gene2vec vectors given: the positional embedding is a fixed random N(0, 1) "
                                   "matrix (pos_embedding_seed=%d), not gene2vec; give the vectors "
                                   "(--gene2vec FILE.npy) to mark genes as scBERT does", config.pos_embedding_seed)
                self.pos_emb.set_gene_vectors(fixed_random_gene_vectors(config))
        elif gene2vec is not None:
            raise ValueError("gene2vec vectors given, but config.pos_embedding is 'none'; "
                             "set pos_embedding='gene2vec' to use them")
        for module in self.modules():  # PEFT modules start at the base model (zero adapters, B = 0)
            if module is not self and hasattr(module, "reset_peft_parameters"):
                module.reset_peft_parameters()

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """(B, L) tokens -> (B, L, d): token + gene embedding, dropout, then the adapter if any."""
        n = input_ids.shape[1]
        if n > self.config.max_seq_len:
            raise ValueError(f"input_ids has {n} positions; the model takes at most max_seq_len="
                             f"{self.config.max_seq_len} (gene_num + 1; tokenize with the model's gene panel)")
        x = self.token_emb(input_ids)
        if self.pos_emb is not None:
            x = x + self.pos_emb(n).to(x.dtype)
        x = self.dropout(x)
        if self.adapter is not None:
            x = x + self.adapter(x)
        return x

    def encode(self, input_ids: torch.Tensor, *, output_hidden_states: bool = False) -> BaseModelOutput:
        """Embeddings -> layers -> final LayerNorm. ``hidden_states``: the embedding output and
        each layer's output (the residual stream, before the final LayerNorm)."""
        x, hidden = self.performer(self.embed(input_ids), output_hidden_states)
        return BaseModelOutput(last_hidden_state=self.norm(x),
                               hidden_states=tuple(hidden) if output_hidden_states else None)

    def forward(self, input_ids, attention_mask=None, *, output_hidden_states: bool = False, return_dict: bool = True):
        """``attention_mask``: ``None`` or all ones (binned rows have no padding), accepted so the
        BERT family's calls ``model(input_ids, attention_mask)`` run unchanged."""
        check_no_padding(attention_mask)
        return self.encode(input_ids, output_hidden_states=output_hidden_states)


# ----------------------------------------------------------------------------- heads
class PerformerForMaskedLM(PerformerModel):
    """Masked expression modelling: ``to_out`` (d -> num_tokens) at every position.

    ``labels`` (B, L): the original token at masked positions and ``bin_num + 1`` (the mask
    token, scBERT's ignore label) elsewhere; -100 is ignored too.
    """

    head_prefixes = ("to_out.",)

    def __init__(self, config: PerformerConfig, **kwargs: Any) -> None:
        super().__init__(config, **kwargs)
        self.to_out = nn.Linear(config.dim, config.num_tokens)

    def _loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        ignore = self.config.mask_token_id
        labels = labels.masked_fill(labels == -100, ignore)
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1), ignore_index=ignore)

    def forward(self, input_ids, attention_mask=None, labels=None, *, output_hidden_states: bool = False,
                return_dict: bool = True):
        check_no_padding(attention_mask)
        out = self.encode(input_ids, output_hidden_states=output_hidden_states)
        logits = self.to_out(out.last_hidden_state)  # (B, L, num_tokens)
        loss = self._loss(logits, labels) if labels is not None else None
        return MaskedLMOutput(loss=loss, logits=logits, hidden_states=out.hidden_states)

    def masked_lm_loss(self, input_ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """The same loss, decoding only the masked positions (pretraining)."""
        seq = self.encode(input_ids).last_hidden_state
        picked = (labels != self.config.mask_token_id) & (labels != -100)
        return F.cross_entropy(self.to_out(seq[picked]).float(), labels[picked])


class ClassificationHead(nn.Module):
    """scBERT's fine-tuning head (its ``Identity``): a Conv2d(1, 1, (1, d)) reading each
    position's vector, ReLU, then Linear(L, 512), ReLU, dropout, Linear(512, 128), ReLU,
    dropout, Linear(128, num_labels). (B, L, d) -> (B, num_labels); L must be max_seq_len."""

    def __init__(self, config: PerformerConfig) -> None:
        super().__init__()
        h1, h2 = config.classifier_hidden_sizes
        self.conv1 = nn.Conv2d(1, 1, (1, config.dim))
        self.act = nn.ReLU()
        self.fc1 = nn.Linear(config.max_seq_len, h1)
        self.act1 = nn.ReLU()
        self.dropout1 = Dropout(config.classifier_dropout)
        self.fc2 = nn.Linear(h1, h2)
        self.act2 = nn.ReLU()
        self.dropout2 = Dropout(config.classifier_dropout)
        self.fc3 = nn.Linear(h2, config.num_labels)

    def forward(self, x):
        b, n, d = x.shape
        if n != self.fc1.in_features:
            raise ValueError(f"the classifier reads all {self.fc1.in_features} positions (max_seq_len); "
                             f"got {n}")
        # the (1, d) convolution is one dot product per position: run it as a matmul
        x = self.act(F.linear(x, self.conv1.weight.view(1, d), self.conv1.bias)).view(b, n)  # (B, L)
        x = self.dropout1(self.act1(self.fc1(x)))
        x = self.dropout2(self.act2(self.fc2(x)))
        return self.fc3(x)  # (B, num_labels)


class PerformerForSequenceClassification(PerformerModel):
    """Cell classification with scBERT's head on the final LayerNorm's output."""

    head_prefixes = ("to_out.",)

    def __init__(self, config: PerformerConfig, **kwargs: Any) -> None:
        super().__init__(config, **kwargs)
        self.num_labels = config.num_labels
        self.to_out = ClassificationHead(config)

    def forward(self, input_ids, attention_mask=None, labels=None, *, output_hidden_states: bool = False,
                return_dict: bool = True):
        check_no_padding(attention_mask)
        out = self.encode(input_ids, output_hidden_states=output_hidden_states)
        logits = self.to_out(out.last_hidden_state)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits.float(), labels.view(-1))
        return SequenceClassifierOutput(loss=loss, logits=logits, hidden_states=out.hidden_states)


# ----------------------------------------------------------------------------- performer-pytorch names
_PP_COUNTER = "performer.proj_updater.calls_since_last_redraw"
_PP_DUPLICATE = "performer.proj_updater.instance."
_COUNTER = "performer.calls_since_last_redraw"


def from_performer_pytorch_state_dict(state: dict[str, torch.Tensor], *, source: str = "state dict"
                                      ) -> dict[str, torch.Tensor]:
    """Our names from performer-pytorch 1.1.4's: drop the ``performer.proj_updater.instance.*``
    copies (checked equal to ``performer.net.*``) and rename the redraw counter. Names of
    the scBERT release (and ours) pass unchanged."""
    out: dict[str, torch.Tensor] = {}
    for key, tensor in state.items():
        if key.startswith(_PP_DUPLICATE):
            twin = "performer.net." + key[len(_PP_DUPLICATE):]
            if twin in state and not torch.equal(state[twin], tensor):
                raise ValueError(f"{source}: {key} differs from {twin}; performer-pytorch holds one tensor "
                                 "under both names, so this state dict was edited")
            if twin not in state:
                out[twin] = tensor
            continue
        out[_COUNTER if key == _PP_COUNTER else key] = tensor
    return out


def to_performer_pytorch_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """performer-pytorch 1.1.4's names from ours (``PerformerLM.load_state_dict`` takes it strictly)."""
    out: dict[str, torch.Tensor] = {}
    for key, tensor in state.items():
        out[_PP_COUNTER if key == _COUNTER else key] = tensor
    for key, tensor in state.items():
        if key.startswith("performer.net."):
            out[_PP_DUPLICATE + key[len("performer.net."):]] = tensor
    return out
