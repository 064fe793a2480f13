"""Released scBERT checkpoints (``panglao_pretrain.pth``) -> a checkpoint folder of ours.

The release is a torch pickle ``{"model_state_dict": {...}, ...}`` whose keys are
performer-pytorch's ``PerformerLM`` names, which are ours (:mod:`.modeling_performer`), so
the conversion reads the sizes from the tensors' shapes, checks that every key has a place,
and writes ``config.json`` + ``model.safetensors``. A fine-tuned release checkpoint (its head
``to_out.conv1/fc1/fc2/fc3``) converts to :class:`PerformerForSequenceClassification`, a
pretrained one (``to_out`` linear) to :class:`PerformerForMaskedLM`.
"""
from __future__ import annotations

import logging
import os
import pickle
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .configuration_performer import KEY_STABILIZERS, PerformerConfig
from .modeling_performer import (
    PerformerForMaskedLM,
    PerformerForSequenceClassification,
    PerformerModel,
    from_performer_pytorch_state_dict,
)

logger = logging.getLogger(__name__)

__all__ = ["GENE_PANEL_NAME", "config_from_state_dict", "convert_scbert_checkpoint", "read_released_state_dict"]

#: the panel written beside a converted checkpoint (one gene name a line, position order)
GENE_PANEL_NAME = "gene_panel.txt"
_LAYER = re.compile(r"^performer\.net\.layers\.(\d+)\.")


def read_released_state_dict(path: str | os.PathLike, *, allow_pickle: bool = False) -> dict[str, torch.Tensor]:
    """The model's tensors from a released ``.pth``: ``model_state_dict`` when present, else the
    file's top-level dict of tensors; a ``module.`` prefix (DistributedDataParallel) is removed.

    ``allow_pickle=False`` reads with ``torch.load(weights_only=True)``, which runs no code from
    the file; pass ``True`` only for a file you trust that needs more.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"--checkpoint {path} does not exist; expected a scBERT .pth file")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=not allow_pickle)
    except pickle.UnpicklingError as err:
        raise ValueError(f"{path}: cannot be read as tensors only ({str(err).splitlines()[0]}); if you trust "
                         "the file, pass --allow_pickle to unpickle it fully") from err
    state = obj.get("model_state_dict", obj) if isinstance(obj, Mapping) else None
    if not isinstance(state, Mapping) or not state or not all(torch.is_tensor(v) for v in state.values()):
        keys = sorted(obj)[:8] if isinstance(obj, Mapping) else type(obj).__name__
        raise ValueError(f"{path}: expected a dict with 'model_state_dict' (a dict of tensors), as scBERT's "
                         f"checkpoints hold; found {keys}")
    state = dict(state)
    if all(k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
    return state


def _require(state: Mapping[str, torch.Tensor], key: str, source: str) -> torch.Tensor:
    if key not in state:
        raise ValueError(f"{source}: no tensor {key!r}; expected a scBERT / performer-pytorch PerformerLM "
                         "state dict")
    return state[key]


def config_from_state_dict(state: Mapping[str, torch.Tensor], *, source: str = "state dict",
                           max_seq_len: int | None = None, **overrides: Any) -> tuple[PerformerConfig, type]:
    """The config that fits ``state`` (sizes from the tensors' shapes) and the model class of its head.

    Parameters
    ----------
    state
        A state dict in our / the release's names (performer-pytorch 1.1.4's are mapped first).
    source
        Named in error messages.
    max_seq_len
        Needed only when the state holds no positional embedding (``pos_emb.emb.weight``).
    **overrides
        Further config keys (``key_stabilizer``, ``feature_redraw_interval`` ...).
    """
    state = from_performer_pytorch_state_dict(dict(state), source=source)
    num_tokens, dim = _require(state, "token_emb.weight", source).shape
    layers = sorted({int(m.group(1)) for k in state if (m := _LAYER.match(k))})
    if not layers or layers != list(range(len(layers))):
        raise ValueError(f"{source}: layer indices {layers}; expected performer.net.layers.0 .. N-1")
    if any(".local_attn." in k for k in state):
        raise ValueError(f"{source}: holds local-attention weights (local_attn_heads > 0); scBERT uses none "
                         "and they are not built here")
    prefix = "performer.net.layers.0."
    nb_features, dim_head = _require(state, prefix + "0.fn.fast_attention.projection_matrix", source).shape
    inner = _require(state, prefix + "0.fn.to_q.weight", source).shape[0]
    hidden = _require(state, prefix + "1.fn.fn.w2.weight", source).shape[1]
    if _require(state, prefix + "1.fn.fn.w1.weight", source).shape[0] != hidden:
        raise ValueError(f"{source}: feed-forward w1 is twice as wide as w2 reads (ff_glu); not built here")
    if inner % dim_head or hidden % dim:
        raise ValueError(f"{source}: to_q has {inner} rows and w2 {hidden} columns; expected multiples of "
                         f"dim_head={dim_head} and dim={dim}")
    if "pos_emb.emb.weight" in state:
        pos_rows = state["pos_emb.emb.weight"].shape[0]
        if max_seq_len is not None and max_seq_len != pos_rows:
            raise ValueError(f"{source}: the positional embedding has {pos_rows} rows (max_seq_len = gene_num + 1), "
                             f"but {max_seq_len} positions were asked for (a gene panel of {max_seq_len - 1})")
        max_seq_len, pos_embedding = pos_rows, "gene2vec"
    elif max_seq_len is None:
        raise ValueError(f"{source}: holds no positional embedding (pos_emb.emb.weight), so the number of "
                         "positions cannot be read from it; give the gene panel (--gene_panel)")
    else:
        pos_embedding = "none"
    kwargs: dict[str, Any] = dict(
        num_tokens=int(num_tokens), max_seq_len=int(max_seq_len), dim=int(dim), depth=len(layers),
        heads=inner // dim_head, dim_head=int(dim_head), nb_features=int(nb_features), ff_mult=hidden // dim,
        qkv_bias=prefix + "0.fn.to_q.bias" in state, attn_out_bias=prefix + "0.fn.to_out.bias" in state,
        pos_embedding=pos_embedding)
    if "to_out.fc1.weight" in state:
        model_class = PerformerForSequenceClassification
        kwargs["classifier_hidden_sizes"] = [int(state["to_out.fc1.weight"].shape[0]),
                                             int(_require(state, "to_out.fc2.weight", source).shape[0])]
        kwargs["num_labels"] = int(_require(state, "to_out.fc3.weight", source).shape[0])
    elif "to_out.weight" in state:
        model_class = PerformerForMaskedLM
    else:
        model_class = PerformerModel
    kwargs.update(overrides)
    return PerformerConfig(**kwargs), model_class


def convert_scbert_checkpoint(checkpoint: str | os.PathLike, output_dir: str | os.PathLike, *,
                              gene2vec: np.ndarray | None = None, gene_panel: Sequence[str] | None = None,
                              key_stabilizer: str = "cell", allow_pickle: bool = False,
                              **config_overrides: Any) -> Path:
    """Convert a released scBERT ``.pth`` into ``output_dir`` (``config.json``, ``model.safetensors``
    and, with ``gene_panel``, ``gene_panel.txt``).

    Parameters
    ----------
    checkpoint
        The ``.pth`` (``{"model_state_dict": ...}`` in performer-pytorch names).
    output_dir
        The checkpoint folder to write.
    gene2vec
        The gene vectors (gene_num, dim) the model was trained with: checked against the
        checkpoint's positional embedding (the release stores them in it), or an error.
    gene_panel
        The panel's gene names in position order (gene_num of them), written beside the weights.
    key_stabilizer
        ``"cell"`` (default) computes as the scBERT release's vendored performer copy run one
        cell at a time; ``"head"`` as performer-pytorch >= 1.0 (see ``docs/scbert.md``).
    allow_pickle
        Unpickle the file fully (only for a trusted file that ``weights_only`` cannot read).
    **config_overrides
        Further config keys.

    Returns
    -------
    pathlib.Path
        ``output_dir``.
    """
    if key_stabilizer not in KEY_STABILIZERS:
        raise ValueError(f"key_stabilizer {key_stabilizer!r} is not valid; expected one of {list(KEY_STABILIZERS)}")
    source = str(checkpoint)
    state = from_performer_pytorch_state_dict(read_released_state_dict(checkpoint, allow_pickle=allow_pickle),
                                              source=source)
    config, model_class = config_from_state_dict(
        state, source=source, max_seq_len=None if gene_panel is None else len(gene_panel) + 1,
        key_stabilizer=key_stabilizer, **config_overrides)
    not_float32 = sorted({str(v.dtype) for v in state.values() if v.is_floating_point() and v.dtype != torch.float32})
    if not_float32:
        logger.info("%s: casting %s tensors to float32", source, ", ".join(not_float32))
    state = {k: v.float() if v.is_floating_point() else v for k, v in state.items()}
    if "performer.calls_since_last_redraw" not in state:
        logger.info("%s: no redraw counter (performer.calls_since_last_redraw); starting it at 0", source)
        state["performer.calls_since_last_redraw"] = torch.tensor(0)
    model = model_class(config, warn_random_positions=False)
    info = model.load_checkpoint_state(state, source=source)
    if info["missing_keys"] or info["discarded_head_keys"] or info["mismatched_keys"]:
        raise ValueError(f"{source}: did not convert cleanly into {model_class.__name__}: {info}")
    if gene2vec is not None:
        _check_gene2vec(model, np.asarray(gene2vec), source)
    output_dir = Path(output_dir)
    model.save_pretrained(output_dir)
    if gene_panel is not None:
        (output_dir / GENE_PANEL_NAME).write_text("".join(f"{g}\n" for g in gene_panel), encoding="utf-8")
    logger.info("converted %s -> %s (%s: %d positions, %d layers, dim %d, %d heads, %d random features)",
                source, output_dir, model_class.__name__, config.max_seq_len, config.depth, config.dim,
                config.heads, config.nb_features)
    return output_dir


def _check_gene2vec(model: PerformerModel, gene2vec: np.ndarray, source: str) -> None:
    if model.pos_emb is None:
        raise ValueError(f"{source} was trained without a positional embedding; gene2vec vectors would change "
                         "its outputs (leave out --gene2vec)")
    stored = model.pos_emb.emb.weight[:-1]
    if gene2vec.shape != tuple(stored.shape):
        raise ValueError(f"--gene2vec has shape {gene2vec.shape}; the checkpoint's positional embedding holds "
                         f"{tuple(stored.shape)} (gene_num x dim)")
    diff = (torch.from_numpy(gene2vec.astype(np.float32)) - stored).abs().max().item()
    if diff > 1e-6:
        raise ValueError(f"--gene2vec differs from the vectors stored in {source} (max |difference| {diff:.3g}); "
                         "the checkpoint's own vectors are what it was trained with")
    logger.info("--gene2vec matches the checkpoint's positional embedding (max |difference| %.1e)", diff)
