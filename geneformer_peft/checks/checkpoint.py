"""Checks of the model side: the checkpoint's config against its weights, the token dictionary
against the checkpoint's own, the genes whose rows were pretrained, a fold's base checkpoint."""
from __future__ import annotations

import json
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from geneformer_peft.checks.report import OK, REFUSED, CompatibilityReport
from geneformer_peft.data.vocab import CLS_TOKEN, EOS_TOKEN, MASK_TOKEN, PAD_TOKEN, TOKENIZER_FILE, is_special_token
from geneformer_peft.errors import DataError

__all__ = ["check_base_model", "check_checkpoint_shapes", "check_token_dictionary", "checkpoint_token_dictionary",
           "weight_shapes"]

#: vocabulary rows a checkpoint may carry beyond its dictionary (remap-vocab pads to a multiple of 8)
VOCAB_PADDING = 8


def weight_shapes(model_path: str | Path) -> dict[str, tuple[int, ...]]:
    """Tensor name -> shape of a checkpoint folder's weights, read from the file headers where the
    format allows (safetensors) and memory-mapped otherwise."""
    import torch
    from safetensors import safe_open

    from transformerslocal.modeling_utils import find_weights_file

    file = find_weights_file(Path(model_path))
    files = [file]
    if file.name.endswith(".index.json"):
        index = json.loads(file.read_text(encoding="utf-8"))
        files = [file.parent / shard for shard in sorted(set(index["weight_map"].values()))]
    shapes: dict[str, tuple[int, ...]] = {}
    for part in files:
        try:
            if part.suffix == ".safetensors":
                with safe_open(str(part), framework="pt") as handle:
                    shapes.update({k: tuple(handle.get_slice(k).get_shape()) for k in handle.keys()})
            else:
                try:
                    state = torch.load(part, map_location="cpu", weights_only=True, mmap=True)
                except RuntimeError:  # a legacy (pre-zip) torch file cannot be memory-mapped: read it whole
                    state = torch.load(part, map_location="cpu", weights_only=True)
                shapes.update({k: tuple(v.shape) for k, v in state.items() if hasattr(v, "shape")})
        except Exception as error:  # noqa: BLE001 - every reader's own error type: name the file
            raise DataError(f"{part}: truncated or not a checkpoint ({type(error).__name__}: {error}); expected a "
                            "complete weight file: copy or download it again") from None
    return shapes


def _find(shapes: Mapping[str, tuple], suffix: str) -> tuple[str, tuple] | None:
    for key, shape in shapes.items():
        if key == suffix or key.endswith("." + suffix):
            return key, shape
    return None


def _layer_count(shapes: Mapping[str, tuple], pattern: str) -> int:
    indices = {int(m.group(1)) for key in shapes if (m := re.search(pattern, key))}
    return max(indices) + 1 if indices else 0


def _expected(config: Any) -> tuple[list[tuple[str, int, int, str]], tuple[str, str, int]]:
    """(tensor suffix, axis, expected size, config key) per checked dimension, and the layer
    pattern with its config key and value, for the config's family."""
    if getattr(config, "model_type", None) == "cellfm":
        dims = [("gene_emb", 0, config.vocab_size, "vocab_size"), ("gene_emb", 1, config.hidden_size, "hidden_size"),
                ("value_enc.value_enc.table.weight", 1, config.value_slots, "value_slots"),
                ("encoder.0.ffn.u_proj.weight", 0, config.intermediate_size, "intermediate_size")]
        return dims, (r"(?:^|\.)encoder\.(\d+)\.", "num_hidden_layers", config.num_hidden_layers)
    if hasattr(config, "num_tokens"):  # scBERT's Performer
        dims = [("token_emb.weight", 0, config.num_tokens, "num_tokens"), ("token_emb.weight", 1, config.dim, "dim"),
                ("pos_emb.emb.weight", 0, config.max_seq_len, "max_seq_len")]
        return dims, (r"performer\.net\.layers\.(\d+)\.", "depth", config.depth)
    dims = [("embeddings.word_embeddings.weight", 0, config.vocab_size, "vocab_size"),
            ("embeddings.word_embeddings.weight", 1, config.hidden_size, "hidden_size"),
            ("embeddings.position_embeddings.weight", 0, config.max_position_embeddings, "max_position_embeddings"),
            ("encoder.layer.0.intermediate.dense.weight", 0, config.intermediate_size, "intermediate_size")]
    return dims, (r"encoder\.layer\.(\d+)\.", "num_hidden_layers", config.num_hidden_layers)


def check_checkpoint_shapes(report: CompatibilityReport, model_path: str | Path, config: Any
                            ) -> dict[str, tuple[int, ...]]:
    """Refuse a checkpoint whose ``config.json`` describes another model than its weights hold
    (e.g. 6 layers in the config, 3 in the weights: layers 3-5 would train from random values).
    Returns the weights' shapes (name -> shape)."""
    shapes = weight_shapes(model_path)
    dims, (pattern, layer_key, layers) = _expected(config)
    wrong = []
    for suffix, axis, want, key in dims:
        found = _find(shapes, suffix)
        if found is not None and len(found[1]) > axis and found[1][axis] != want:
            wrong.append(f"{key}={want} but {found[0]} has {found[1][axis]} (shape {list(found[1])})")
    in_weights = _layer_count(shapes, pattern)
    if not in_weights and all(_find(shapes, suffix) is None for suffix, *_ in dims):
        from transformerslocal.modeling_utils import find_weights_file

        file = find_weights_file(Path(model_path))
        report.add("checkpoint", REFUSED, f"{file} holds none of the tensors of the model its config.json describes "
                   f"(e.g. {dims[0][0]}; found {sorted(shapes)[:3]}...): weights of another model? Put the "
                   "checkpoint's own weights beside its config.json", mismatches=["foreign weights"])
        return shapes
    if in_weights and in_weights != layers:
        wrong.append(f"{layer_key}={layers} but the weights hold {in_weights} layers")
    where = f"{Path(model_path) / 'config.json'}"
    if wrong:
        report.add("checkpoint", REFUSED, f"{where} does not describe its weights: {'; '.join(wrong)}; use the "
                   "config.json that was saved with these weights", mismatches=wrong)
    else:
        report.add("checkpoint", OK, f"config.json agrees with the weights ({in_weights} layers)", layers=in_weights,
                   tensors=len(shapes))
    return shapes


def check_token_dictionary(report: CompatibilityReport, dictionary: Mapping[str, int], source: str, *,
                           checkpoint_dictionary: Mapping[str, int] | None, checkpoint_source: str | None,
                           vocab_size: int, model_version: str | None = None, resize: bool | None = None) -> None:
    """The data's token dictionary against the model: the checkpoint's own one (when it has a
    tokenizer.json), its special tokens, contiguous ids and a size the embedding matrix holds.

    ``resize``: ``None`` outside pretraining; for ``pretrain``, whether ``--resize_vocab`` sizes
    the new model to the dictionary (then any size is fine)."""
    problems = []
    if checkpoint_dictionary is not None and dict(dictionary) != dict(checkpoint_dictionary):
        only_here = sorted(set(dictionary) - set(checkpoint_dictionary))
        moved = sorted(t for t in set(dictionary) & set(checkpoint_dictionary)
                       if dictionary[t] != checkpoint_dictionary[t])
        problems.append(f"{source} is not the dictionary the checkpoint was trained with ({checkpoint_source}): "
                        f"{len(dictionary)} vs {len(checkpoint_dictionary)} tokens, {len(only_here)} tokens only in "
                        f"{source} (e.g. {only_here[:3]}), {len(moved)} shared tokens with other ids (e.g. "
                        f"{moved[:3]}); tokenize with the checkpoint's tokenizer.json, or put the checkpoint on your "
                        "dictionary first (geneformer-peft remap-vocab)")
    required = [PAD_TOKEN, MASK_TOKEN] + ([CLS_TOKEN, EOS_TOKEN] if model_version == "V2" else [])
    missing = [t for t in required if t not in dictionary]
    if missing:
        problems.append(f"{source} lacks {missing}; a Geneformer dictionary holds {required} (without {PAD_TOKEN} "
                        "a real gene would get the padding id 0)")
    ids = sorted(int(v) for v in dictionary.values())
    if ids and ids != list(range(len(ids))):
        gaps = sorted(set(range(ids[-1] + 1)) - set(ids))
        problems.append(f"{source}: token ids are not contiguous from 0 (missing e.g. {gaps[:5]}, largest {ids[-1]})")
    size = len(dictionary)
    # outside pretraining, extra embedding rows are harmless (remap-vocab pads; the token-id check
    # bounds the ids); a new model from a config must match unless resized
    fits = size <= vocab_size if resize is None else size <= vocab_size < size + VOCAB_PADDING
    if not resize and not fits:
        problems.append(f"{source} holds {size} tokens but the model's vocab_size is {vocab_size}; expected "
                        + ("at least as many embedding rows as tokens" if resize is None else
                           "the same size (up to padding to a multiple of 8)")
                        + ("; pass --resize_vocab to size the new model to the dictionary" if resize is False else ""))
    n_genes = sum(1 for t in dictionary if not is_special_token(str(t)))
    if problems:
        report.add("token_dictionary", REFUSED, "; ".join(problems), source=source, size=size, genes=n_genes,
                   vocab_size=vocab_size, checkpoint_dictionary=checkpoint_source)
    else:
        same = " (the checkpoint's own)" if checkpoint_dictionary is not None else ""
        report.add("token_dictionary", OK, f"{source}{same}: {size} tokens, {n_genes} genes, vocab_size {vocab_size}",
                   source=source, size=size, genes=n_genes, vocab_size=vocab_size,
                   checkpoint_dictionary=checkpoint_source)


def checkpoint_token_dictionary(model_path: str | Path) -> tuple[dict[str, int] | None, str | None]:
    """The checkpoint's own dictionary and its file, or ``(None, None)``: the folder's
    tokenizer.json, token_dictionary.pkl or token_dictionary.json (the files the analyses read).

    Raises
    ------
    DataError
        When the folder holds two of them that differ (which one the model was trained with is
        then unknown).
    """
    from geneformer_peft.data.vocab import load_token_dictionary

    files = [Path(model_path) / name for name in (TOKENIZER_FILE, "token_dictionary.pkl", "token_dictionary.json")]
    found = [(load_token_dictionary(f), f) for f in files if f.is_file()]
    if not found:
        return None, None
    first, first_file = found[0]
    for other, other_file in found[1:]:
        if other != first:
            raise DataError(f"{model_path} holds two different token dictionaries, {first_file.name} and "
                            f"{other_file.name} ({len(first)} and {len(other)} tokens); keep the one the model was "
                            "trained with")
    return first, str(first_file)


def check_base_model(report: CompatibilityReport, fold_path: str | Path, base_model: str | Path, *,
                     allow_other_base: bool = False) -> None:
    """A fold's PEFT-only weights belong on the checkpoint they were trained on: compare the base's
    SHA-256 with the one the fold's provenance.json recorded."""
    from geneformer_peft.fingerprints import checkpoint_fingerprint, read_provenance, shared_cache

    provenance = read_provenance(fold_path)
    checkpoint = ((provenance or {}).get("settings") or {}).get("checkpoint") or {}
    recorded, trained_on = checkpoint.get("files"), checkpoint.get("path")
    if not recorded:
        report.add("base_model", OK, f"{fold_path} records no base checkpoint (no provenance.json); the base "
                   f"{base_model} cannot be compared", compared=False)
        return
    current = checkpoint_fingerprint(base_model, shared_cache())["files"]
    weights = [name for name in recorded if name != "config.json"]
    differ = [(name, recorded[name]["sha256"], (current.get(name) or {}).get("sha256")) for name in weights
              if (current.get(name) or {}).get("sha256") != recorded[name]["sha256"]]
    if not differ:
        report.add("base_model", OK, f"{base_model} is the checkpoint the fold was trained on (SHA-256 equal)",
                   compared=True)
        return
    desc = "; ".join(f"{name}: trained on {want[:16]}..., given {(got or 'absent')[:16]}..." for name, want, got
                     in differ)
    status = OK if allow_other_base else REFUSED
    report.add("base_model", status, f"--base_model {base_model} is not the checkpoint {fold_path} was trained on "
               f"({desc})" + ("; allowed by --allow_other_base" if allow_other_base else
                              f"; pass the base the fold was trained on ({trained_on}), or --allow_other_base"),
               compared=True, recorded={n: w for n, w, _ in differ}, given={n: g for n, _, g in differ})
