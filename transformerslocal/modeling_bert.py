"""BERT for Geneformer, with the PEFT hook points.

One model, one file, in reading order: embeddings -> attention -> layer -> encoder ->
pooler -> heads. Module attribute paths are the checkpoint contract of HuggingFace BERT
(``bert.encoder.layer.N.attention.self.query`` ...), so Geneformer checkpoints load as
they are. At each hook point the model asks the PEFT registry (:mod:`.peft.registry`) what
the methods in ``config.prompt_type`` build there; a point no active method uses holds the
plain module or nothing (no parameter, no state-dict key):

- ``peft_linear``: the six projections of a layer (``attention.self.{query,key,value}``,
  ``attention.output.dense``, ``intermediate.dense``, ``output.dense``), plain ``nn.Linear``
  or a method's subclass of it (LoRA, IA3, DoRA) keeping the ``weight`` / ``bias`` names;
- ``peft_module("embedding_output")``: ``bert.adapter``, E' = E + adapter(E);
- ``peft_module("attention_output", i)``: ``attention.Space_Adapter``, LN(a + adapter(a) + x);
- ``peft_module("ffn_output", i)``: ``MLP_Adapter``, LN(f + adapter(h) + h);
- ``peft_module("layer_prompt", i)``: ``encoder.layer.N.prompt_embeddings``, prompt tokens the
  encoder inserts, overwrites and removes.

Which method uses which point: ``docs/peft_keys.md`` §3, §7.
Shapes: B batch, L gene tokens, T prompt tokens, d hidden, h heads, hs head size.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from .configuration_bert import BertConfig
from .dropout import Dropout, dropout
from .modeling_outputs import (
    BaseModelOutput,
    MaskedLMOutput,
    SequenceClassifierOutput,
    TokenClassifierOutput,
)
from .modeling_utils import BertPreTrainedModel
from .peft.registry import peft_linear, peft_module

ACT2FN = {
    "gelu": nn.GELU(),
    "relu": nn.ReLU(),
    "gelu_new": nn.GELU(approximate="tanh"),
    "gelu_pytorch_tanh": nn.GELU(approximate="tanh"),
    "silu": nn.SiLU(),
    "swish": nn.SiLU(),
    "tanh": nn.Tanh(),
}
# in-place forms, used when no autograd graph is recorded (inference): the activation then
# overwrites the intermediate projection's fresh output instead of allocating another
# (B, L, intermediate_size) tensor. GELU has no in-place form.
ACT2FN_INPLACE = {
    "relu": torch.relu_,
    "silu": lambda x: F.silu(x, inplace=True),
    "swish": lambda x: F.silu(x, inplace=True),
    "tanh": torch.tanh_,
}


def add_residual(out: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
    """``out + residual``, written into ``out`` (a sublayer's fresh output) when no autograd
    graph is recorded: inference saves an allocation and a pass over (B, L, d)."""
    return out + residual if torch.is_grad_enabled() else out.add_(residual)


# ----------------------------------------------------------------------------- embeddings
class BertEmbeddings(nn.Module):
    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        self.word_embeddings = nn.Embedding(config.vocab_size, config.hidden_size, padding_idx=config.pad_token_id)
        self.position_embeddings = nn.Embedding(config.max_position_embeddings, config.hidden_size)
        self.token_type_embeddings = nn.Embedding(config.type_vocab_size, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = Dropout(config.hidden_dropout_prob)
        self.register_buffer("position_ids", torch.arange(config.max_position_embeddings).unsqueeze(0),
                             persistent=False)

    def forward(self, input_ids, token_type_ids=None, position_ids=None):
        seq_len = input_ids.shape[1]
        if seq_len > self.position_embeddings.num_embeddings:
            raise ValueError(
                f"input_ids has {seq_len} tokens; the model takes at most max_position_embeddings="
                f"{self.position_embeddings.num_embeddings} (truncate the cells, e.g. --max_length)")
        if position_ids is None:
            position_ids = self.position_ids[:, :seq_len]
        emb = self.word_embeddings(input_ids) + self.position_embeddings(position_ids)  # (B, L, d)
        if token_type_ids is None:
            emb = emb + self.token_type_embeddings.weight[0]
        else:
            emb = emb + self.token_type_embeddings(token_type_ids)
        return self.dropout(self.LayerNorm(emb))


# ----------------------------------------------------------------------------- attention
def attention_with_cpu_dropout(q, k, v, keys_mask, p: float) -> torch.Tensor:
    """softmax(q k^T / sqrt(hs) + mask) with dropout p, times v; (B, h, L, hs) -> (B, h, L, hs).

    With dropout on, SDPA on CPU runs its unfused math kernel anyway; this is the same
    computation with the cheaper CPU dropout mask (:mod:`.dropout`), the scale applied to q
    (L x hs) rather than to the scores (L x L), and the key mask filled into the scores in
    place. Padded keys get probability 0, padded query rows are computed and ignored
    downstream, as in SDPA.
    """
    b, h, n, hs = q.shape
    q3 = q.reshape(b * h, n, hs) * hs ** -0.5
    scores = torch.bmm(q3, k.reshape(b * h, n, hs).transpose(1, 2))  # (B*h, L, L)
    if keys_mask is not None:
        masked = ~keys_mask.expand(b, h, 1, n).reshape(b * h, 1, n)
        # filled outside autograd: the softmax gradient at these positions is exactly 0 anyway
        # (their probabilities underflow to 0), so autograd's masking of it would only copy
        scores.detach().masked_fill_(masked, torch.finfo(scores.dtype).min)
    if scores.dtype == torch.float32:
        probs = scores.softmax(dim=-1)
    else:  # bf16/fp16 under autocast: normalise in float32 (sums over up to 2,048 keys)
        probs = scores.softmax(dim=-1, dtype=torch.float32).to(scores.dtype)
    probs = dropout(probs, p)
    return torch.bmm(probs, v.reshape(b * h, n, hs)).view(b, h, n, hs)


class BertSelfAttention(nn.Module):
    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.head_size = config.hidden_size // config.num_attention_heads
        d = config.hidden_size
        for name in ("query", "key", "value"):
            setattr(self, name, peft_linear(config, f"attention.self.{name}", nn.Linear(d, d)))
        self.dropout_prob = config.attention_probs_dropout_prob
        self.dropout = Dropout(config.attention_probs_dropout_prob)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        return x.view(b, n, self.num_heads, self.head_size).transpose(1, 2)  # (B, h, L, hs)

    def forward(self, hidden, attn_mask=None, output_attentions=False, queries=None):
        """``queries`` (B, Lq, d): the rows whose outputs are wanted (default: all of ``hidden``);
        keys and values always come from all of ``hidden``."""
        q = self._heads(self.query(hidden if queries is None else queries))
        k = self._heads(self.key(hidden))
        v = self._heads(self.value(hidden))
        if output_attentions:
            # eager path: the probabilities are wanted, so compute them explicitly
            scores = q @ k.transpose(-1, -2) / math.sqrt(self.head_size)  # (B, h, L, L)
            if attn_mask is not None:
                scores = scores.masked_fill(~attn_mask, torch.finfo(scores.dtype).min)
            probs = scores.softmax(dim=-1)
            ctx = self.dropout(probs) @ v
        elif self.training and self.dropout_prob > 0 and q.device.type == "cpu":
            probs = None
            ctx = attention_with_cpu_dropout(q, k, v, attn_mask, self.dropout_prob)
        else:
            probs = None
            ctx = F.scaled_dot_product_attention(
                q, k, v, attn_mask=attn_mask, dropout_p=self.dropout_prob if self.training else 0.0)
        b, _, n, _ = ctx.shape
        return ctx.transpose(1, 2).reshape(b, n, self.num_heads * self.head_size), probs  # (B, L, d)


class BertSelfOutput(nn.Module):
    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        self.dense = peft_linear(config, "attention.output.dense", nn.Linear(config.hidden_size, config.hidden_size))
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = Dropout(config.hidden_dropout_prob)


class BertAttention(nn.Module):
    def __init__(self, config: BertConfig, layer_index: int) -> None:
        super().__init__()
        self.self = BertSelfAttention(config)
        self.output = BertSelfOutput(config)
        self.Space_Adapter = peft_module("attention_output", config, layer_index)

    def forward(self, hidden, attn_mask=None, output_attentions=False, rows=None):
        # contiguous, as full-width inputs are: every projection then takes the same GEMM path
        x = hidden if rows is None else hidden[:, rows].contiguous()
        ctx, probs = self.self(hidden, attn_mask, output_attentions, queries=x)
        a = self.output.dropout(self.output.dense(ctx))
        if self.Space_Adapter is not None:
            a = a + self.Space_Adapter(a)  # LN(a + adapter(a) + x)
        return self.output.LayerNorm(add_residual(a, x)), probs


# ----------------------------------------------------------------------------- layer
class BertIntermediate(nn.Module):
    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        self.dense = peft_linear(config, "intermediate.dense", nn.Linear(config.hidden_size, config.intermediate_size))
        self.intermediate_act_fn = ACT2FN[config.hidden_act]
        self.act_inplace = ACT2FN_INPLACE.get(config.hidden_act)

    def forward(self, hidden):
        x = self.dense(hidden)
        if self.act_inplace is not None and not torch.is_grad_enabled():
            return self.act_inplace(x)
        return self.intermediate_act_fn(x)


class BertOutput(nn.Module):
    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        self.dense = peft_linear(config, "output.dense", nn.Linear(config.intermediate_size, config.hidden_size))
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = Dropout(config.hidden_dropout_prob)


class BertLayer(nn.Module):
    def __init__(self, config: BertConfig, layer_index: int) -> None:
        super().__init__()
        self.attention = BertAttention(config, layer_index)
        self.intermediate = BertIntermediate(config)
        self.output = BertOutput(config)
        self.MLP_Adapter = peft_module("ffn_output", config, layer_index)
        self.prompt_embeddings = peft_module("layer_prompt", config, layer_index)

    def forward(self, hidden, attn_mask=None, output_attentions=False, rows=None):
        """``rows`` (a slice of positions): compute only those positions' outputs, attending to
        all of ``hidden``; every step after attention is per position."""
        h, probs = self.attention(hidden, attn_mask, output_attentions, rows)
        f = self.output.dropout(self.output.dense(self.intermediate(h)))
        if self.MLP_Adapter is not None:
            f = f + self.MLP_Adapter(h)  # LN(f + s*adapter(h) + h), the scale s inside the adapter
        return self.output.LayerNorm(add_residual(f, h)), probs


# ----------------------------------------------------------------------------- encoder
def sdpa_mask(mask: torch.Tensor | None) -> torch.Tensor | None:
    """(B, L) 0/1 padding mask -> (B, 1, 1, L) boolean keys mask, or None if nothing is padded
    (so SDPA may pick its fused kernels)."""
    if mask is None or bool(mask.all()):
        return None
    return mask.bool()[:, None, None, :]


class BertEncoder(nn.Module):
    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        self.layer = nn.ModuleList(BertLayer(config, i) for i in range(config.num_hidden_layers))
        self.gradient_checkpointing = False

    def forward(self, hidden, attention_mask=None, *, output_hidden_states=False,
                output_attentions=False, start_layer=0, end_layer=None, first_token_only=False):
        """Run layers ``start_layer..end_layer-1`` on ``hidden`` (B, L, d); ``attention_mask`` is (B, L).

        ``start_layer`` > 0 resumes from cached outputs of the frozen first layers;
        ``end_layer`` stops early (to compute those outputs). ``first_token_only``: the caller
        reads only token 0 of the output (the pooler of a classifier), so the last layer
        computes that row alone, (B, 1, d): its keys and values still come from every token,
        but its query, attention output and feed-forward run on one row instead of L. Token 0
        stays at position 0 when prompts are inserted (they go after it).
        """
        if first_token_only and (output_hidden_states or output_attentions):
            raise ValueError("first_token_only returns token 0 alone; it cannot be combined with "
                             "output_hidden_states or output_attentions, which need every token")
        inserted = None  # the layer_prompt module that inserted prompt positions, if any
        attn_mask = sdpa_mask(attention_mask)
        all_hidden, all_attn = [], []
        layers = self.layer[start_layer:end_layer]
        last = len(layers) - 1
        for index, layer in enumerate(layers):
            prompts = layer.prompt_embeddings
            if prompts is not None:
                if inserted is None:
                    hidden, attention_mask = prompts.insert(hidden, attention_mask)
                    attn_mask = sdpa_mask(attention_mask)
                    inserted = prompts
                else:
                    hidden = prompts.overwrite(hidden)
            if output_hidden_states:
                all_hidden.append(inserted.remove(hidden) if inserted is not None else hidden)
            if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
                hidden, probs = checkpoint(layer, hidden, attn_mask, output_attentions, use_reentrant=False)
            else:
                rows = slice(0, 1) if first_token_only and index == last else None
                hidden, probs = layer(hidden, attn_mask, output_attentions, rows)
            if output_attentions:
                all_attn.append(probs)
        if inserted is not None:
            hidden = inserted.remove(hidden)
        if output_hidden_states:
            all_hidden.append(hidden)
        return hidden, (tuple(all_hidden) if output_hidden_states else None), (
            tuple(all_attn) if output_attentions else None)


# ----------------------------------------------------------------------------- pooler
class BertPooler(nn.Module):
    """tanh(dense(.)) of token 0 (``classifier_pooling="first"``, HF's pooler), of the
    mean over real gene tokens (``"mean"``: no prompts, they are already removed; no padding),
    or of their attention-weighted mean (``"attention"``: a learned score per token,
    ``attention`` (d -> 1), softmax over the real tokens)."""

    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.activation = nn.Tanh()
        self.mode = config.classifier_pooling
        if self.mode == "attention":
            self.attention = nn.Linear(config.hidden_size, 1)

    @property
    def reads_token_0_only(self) -> bool:
        """Whether the pooled vector depends on token 0 alone (every mode but ``"mean"`` and ``"attention"``)."""
        return self.mode not in ("mean", "attention")

    def forward(self, hidden, attention_mask=None):
        if self.mode == "attention":
            scores = self.attention(hidden).squeeze(-1).float()  # (B, L)
            if attention_mask is not None:
                scores = scores.masked_fill(attention_mask == 0, torch.finfo(scores.dtype).min)
            weights = torch.softmax(scores, dim=1).to(hidden.dtype).unsqueeze(-1)
            pooled = (hidden * weights).sum(dim=1)
        elif self.mode == "mean":
            if attention_mask is None:
                pooled = hidden.mean(dim=1)
            else:
                m = attention_mask.to(hidden.dtype).unsqueeze(-1)  # (B, L, 1)
                pooled = (hidden * m).sum(dim=1) / m.sum(dim=1).clamp(min=1.0)
        else:
            pooled = hidden[:, 0]
        return self.activation(self.dense(pooled))


# ----------------------------------------------------------------------------- BertModel
class BertModel(BertPreTrainedModel):
    """The encoder: embeddings, optional embedding-output adapter, layers, optional pooler."""

    head_prefixes = ("pooler.",)

    def __init__(self, config: BertConfig, add_pooling_layer: bool = True, *, initialize: bool = True) -> None:
        super().__init__(config)
        self.embeddings = BertEmbeddings(config)
        self.adapter = peft_module("embedding_output", config)
        self.encoder = BertEncoder(config)
        self.pooler = BertPooler(config) if add_pooling_layer else None
        if initialize:  # a head initialises the whole model once itself
            self.post_init()

    def embed(self, input_ids, token_type_ids=None, position_ids=None):
        """Embedding output, after the embedding-output adapter if any (E' = E + adapter(E))."""
        emb = self.embeddings(input_ids, token_type_ids, position_ids)
        if self.adapter is not None:
            emb = emb + self.adapter(emb)
        return emb

    def forward(self, input_ids, attention_mask=None, token_type_ids=None, position_ids=None, *,
                output_hidden_states=False, output_attentions=False, return_dict=True,
                inputs_hidden=None, start_layer=0, first_token_only=False):
        """``first_token_only``: ``last_hidden_state`` is token 0 alone, (B, 1, d), which is all
        a token-0 pooler reads (see :meth:`BertEncoder.forward`)."""
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        hidden = self.embed(input_ids, token_type_ids, position_ids) if inputs_hidden is None else inputs_hidden
        seq, hiddens, attns = self.encoder(
            hidden, attention_mask, output_hidden_states=output_hidden_states,
            output_attentions=output_attentions, start_layer=start_layer, first_token_only=first_token_only)
        pooled = self.pooler(seq, attention_mask) if self.pooler is not None else None
        return BaseModelOutput(last_hidden_state=seq, pooler_output=pooled,
                               hidden_states=hiddens, attentions=attns)


# ----------------------------------------------------------------------------- heads
class BertPredictionHeadTransform(nn.Module):
    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.transform_act_fn = ACT2FN[config.hidden_act]
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, hidden):
        return self.LayerNorm(self.transform_act_fn(self.dense(hidden)))


class BertLMPredictionHead(nn.Module):
    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        self.transform = BertPredictionHeadTransform(config)
        self.decoder = nn.Linear(config.hidden_size, config.vocab_size, bias=False)  # tied to embeddings
        self.bias = nn.Parameter(torch.zeros(config.vocab_size))

    def forward(self, hidden):
        return self.decoder(self.transform(hidden)) + self.bias


class BertOnlyMLMHead(nn.Module):
    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        self.predictions = BertLMPredictionHead(config)

    def forward(self, hidden):
        return self.predictions(hidden)


class BertForMaskedLM(BertPreTrainedModel):
    """Geneformer's pretraining model: predict masked gene tokens."""

    head_prefixes = ("cls.",)

    def __init__(self, config: BertConfig) -> None:
        super().__init__(config)
        self.bert = BertModel(config, add_pooling_layer=False, initialize=False)
        self.cls = BertOnlyMLMHead(config)
        self.post_init()
        self.tie_weights()

    def tie_weights(self) -> None:
        self.cls.predictions.decoder.weight = self.bert.embeddings.word_embeddings.weight

    def forward(self, input_ids, attention_mask=None, token_type_ids=None, position_ids=None,
                labels=None, *, output_hidden_states=False, output_attentions=False, return_dict=True):
        out = self.bert(input_ids, attention_mask, token_type_ids, position_ids,
                        output_hidden_states=output_hidden_states, output_attentions=output_attentions)
        # the decoder (vocab-sized) runs on every token for .logits, as HF does;
        # pretraining uses masked_lm_loss, which decodes the masked positions only
        logits = self.cls(out.last_hidden_state)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits.view(-1, logits.shape[-1]).float(), labels.view(-1), ignore_index=-100)
        return MaskedLMOutput(loss=loss, logits=logits, hidden_states=out.hidden_states, attentions=out.attentions)

    def masked_lm_loss(self, input_ids, attention_mask, labels):
        """MLM loss computing the vocab-sized decoder only at the masked positions (pretraining)."""
        seq = self.bert(input_ids, attention_mask).last_hidden_state
        picked = labels != -100
        logits = self.cls(seq[picked])  # (n_masked, vocab)
        return F.cross_entropy(logits.float(), labels[picked])


class BertForSequenceClassification(BertPreTrainedModel):
    """Cell classification: pooled token 0 (or mean of genes) -> dropout -> classifier."""

    head_prefixes = ("bert.pooler.", "classifier.")

    def __init__(self, config: BertConfig) -> None:
        super().__init__(config)
        self.num_labels = config.num_labels
        self.bert = BertModel(config, add_pooling_layer=True, initialize=False)
        drop = config.classifier_dropout if config.classifier_dropout is not None else config.hidden_dropout_prob
        self.dropout = Dropout(drop)
        self.classifier = nn.Linear(config.hidden_size, config.num_labels)
        self.post_init()

    def forward(self, input_ids, attention_mask=None, token_type_ids=None, position_ids=None,
                labels=None, *, output_hidden_states=False, output_attentions=False, return_dict=True,
                inputs_hidden=None, start_layer=0):
        # in eval mode the logits read token 0 of the last layer only, so that layer computes
        # that row alone (exact: each row after attention is computed on its own). Training
        # runs every row: skipping them would change which dropout masks are drawn.
        first_only = (not self.training and self.bert.pooler.reads_token_0_only
                      and not output_hidden_states and not output_attentions)
        out = self.bert(input_ids, attention_mask, token_type_ids, position_ids,
                        output_hidden_states=output_hidden_states, output_attentions=output_attentions,
                        inputs_hidden=inputs_hidden, start_layer=start_layer, first_token_only=first_only)
        logits = self.classifier(self.dropout(out.pooler_output))  # (B, num_labels)
        loss = None
        if labels is not None:
            if self.num_labels == 1:
                loss = F.mse_loss(logits.squeeze(-1).float(), labels.float())
            else:
                loss = F.cross_entropy(logits.float(), labels.view(-1))
        return SequenceClassifierOutput(loss=loss, logits=logits, hidden_states=out.hidden_states,
                                        attentions=out.attentions)


class BertForTokenClassification(BertPreTrainedModel):
    """Gene classification: one prediction per gene token (prompts never get one)."""

    head_prefixes = ("classifier.",)

    def __init__(self, config: BertConfig) -> None:
        super().__init__(config)
        self.num_labels = config.num_labels
        self.bert = BertModel(config, add_pooling_layer=False, initialize=False)
        drop = config.classifier_dropout if config.classifier_dropout is not None else config.hidden_dropout_prob
        self.dropout = Dropout(drop)
        self.classifier = nn.Linear(config.hidden_size, config.num_labels)
        self.post_init()

    def forward(self, input_ids, attention_mask=None, token_type_ids=None, position_ids=None,
                labels=None, *, output_hidden_states=False, output_attentions=False, return_dict=True):
        out = self.bert(input_ids, attention_mask, token_type_ids, position_ids,
                        output_hidden_states=output_hidden_states, output_attentions=output_attentions)
        logits = self.classifier(self.dropout(out.last_hidden_state))  # (B, L, num_labels)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits.view(-1, self.num_labels).float(), labels.view(-1), ignore_index=-100)
        return TokenClassifierOutput(loss=loss, logits=logits, hidden_states=out.hidden_states,
                                     attentions=out.attentions)
