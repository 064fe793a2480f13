"""Loading and saving HuggingFace BERT checkpoints: ``from_pretrained`` / ``save_pretrained``.

Reads ``config.json`` with ``model.safetensors`` (preferred) or ``pytorch_model.bin``
(sharded ``*.index.json`` too), maps the key spellings found in the wild onto ours
(``LayerNorm.gamma``, ``cls.predictions.decoder.bias``, and each PEFT method's old
spellings, such as the scPEFT reference's ``lora_query``), and reports in one message what
was newly initialised.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import secrets
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .configuration_bert import BertConfig
from .peft.registry import map_checkpoint_key, owner_of

logger = logging.getLogger(__name__)

SAFE_WEIGHTS_NAME = "model.safetensors"
WEIGHTS_NAME = "pytorch_model.bin"
# Buffers some checkpoints carry that we rebuild ourselves.
_BUFFER_KEYS = ("embeddings.position_ids", "embeddings.token_type_ids")
# Keys that belong to some BERT head; a checkpoint may carry another head's weights.
_ANY_HEAD_PREFIXES = ("cls.", "classifier.", "bert.pooler.", "qa_outputs.")
# Tied parameter -> the parameter it is tied to (and that is loaded).
_TIED_KEYS = {"cls.predictions.decoder.weight": "bert.embeddings.word_embeddings.weight"}


def find_weights_file(directory: Path) -> Path:
    """The weights file of a checkpoint folder, or a clear error listing what was looked for."""
    # safetensors first, sharded or not (as HF): it cannot run code and loads without a copy
    names = (SAFE_WEIGHTS_NAME, SAFE_WEIGHTS_NAME + ".index.json", WEIGHTS_NAME, WEIGHTS_NAME + ".index.json")
    for name in names:
        if (directory / name).is_file():
            return directory / name
    from .peft.io import PEFT_WEIGHTS_NAME

    if (directory / PEFT_WEIGHTS_NAME).is_file():
        raise FileNotFoundError(
            f"checkpoint folder {directory} holds {PEFT_WEIGHTS_NAME}, the PEFT weights alone, and no full model "
            f"(looked for {', '.join(names)}): pass the checkpoint they were trained on as --base_model "
            "(base_model= in Python)")
    raise FileNotFoundError(
        f"checkpoint folder {directory} has no weights: looked for {', '.join(names)}. "
        "Point --model_path at a folder holding config.json and the weights (e.g. a Geneformer checkpoint).")


def read_state_dict(file: Path) -> dict[str, torch.Tensor]:
    """Tensors of a ``.safetensors`` / ``.bin`` file, or of every shard of an index file."""
    if file.name.endswith(".index.json"):
        index = json.loads(file.read_text(encoding="utf-8"))
        state: dict[str, torch.Tensor] = {}
        for shard in sorted(set(index["weight_map"].values())):
            state.update(read_state_dict(file.parent / shard))
        return state
    try:
        if file.suffix == ".safetensors":
            from safetensors.torch import load_file
            return load_file(str(file))
        return torch.load(file, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise
    except Exception as error:  # SafetensorError, PytorchStreamReader's RuntimeError, UnpicklingError, EOFError
        raise ValueError(f"{file}: truncated or not a checkpoint ({type(error).__name__}: {error}); "
                         "expected a complete weight file: copy or download it again") from error


class _WholeWriter:
    """The file object ``torch.save`` writes to: each write goes to the file whole (a short
    write is continued), and a failing write raises its :class:`OSError`, which torch then
    reports only as "unexpected pos" (kept as the RuntimeError's ``__context__``)."""

    def __init__(self, raw) -> None:
        self.raw = raw

    def write(self, data) -> int:
        view = memoryview(data).cast("B")
        done = 0
        while done < len(view):
            done += self.raw.write(view[done:])
        return len(view)

    def flush(self) -> None:
        pass


def _write_failure(error: RuntimeError, file: Path, tmp: Path) -> OSError | None:
    """The OSError behind torch's "unexpected pos" / "PytorchStreamWriter failed writing file":
    the one the write raised, else a full disk or ``ulimit -f`` measured now; ``None`` if neither."""
    import errno
    import resource

    link = error.__context__
    while link is not None and not isinstance(link, OSError):
        link = link.__context__
    if link is not None and link.errno is not None:
        return OSError(link.errno, os.strerror(link.errno), str(file))
    limit = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
    with contextlib.suppress(OSError):
        if limit != resource.RLIM_INFINITY and tmp.stat().st_size >= limit:
            return OSError(errno.EFBIG, os.strerror(errno.EFBIG), str(file))
    with contextlib.suppress(OSError):
        stats = os.statvfs(file.parent)
        if stats.f_bavail * stats.f_frsize < 1 << 20:
            return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(file))
    return None


def save_torch(obj: Any, file: str | os.PathLike) -> Path:
    """``torch.save(obj, file)`` atomically (a temporary file beside it, moved into place): the
    one place the project writes a torch file.

    A write that fails raises :class:`OSError` naming ``file`` with its errno (ENOSPC for a full
    disk, EFBIG beyond ``ulimit -f``, ...), where torch alone raises "unexpected pos 7552 vs 7446".

    Parameters
    ----------
    obj : object
        What to save (a state dict, a checkpoint payload).
    file : path-like
        Destination; its folder must exist.

    Returns
    -------
    Path
        ``file``.
    """
    file = Path(file)
    tmp = file.with_name(f".{file.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")  # created with the umask's mode
    try:
        with open(tmp, "xb", buffering=0) as raw:
            try:
                torch.save(obj, _WholeWriter(raw))
            except RuntimeError as error:
                failure = _write_failure(error, file, tmp)
                if failure is None:
                    raise
                raise failure from error
            os.fsync(raw.fileno())
        os.replace(tmp, file)
    except BaseException as error:
        with contextlib.suppress(OSError):
            tmp.unlink()
        if isinstance(error, OSError) and error.errno is not None and error.filename in (None, str(tmp)):
            raise OSError(error.errno, error.strerror, str(file)) from error
        raise
    return file


def write_state_dict(state: dict[str, torch.Tensor], directory: Path, *, safe_serialization: bool = True) -> Path:
    """Write ``model.safetensors`` (or ``pytorch_model.bin``) into ``directory`` atomically.

    The file is written under a temporary name in ``directory`` and moved into place, so a
    reader sees the old file or the complete new one. Tensors are made contiguous; nothing
    else about ``state`` is changed (the caller drops or adds tied keys).

    Returns
    -------
    Path
        The file written.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous() for k, v in state.items()}
    file = directory / (SAFE_WEIGHTS_NAME if safe_serialization else WEIGHTS_NAME)
    tmp = file.with_name(file.name + ".tmp")
    if safe_serialization:
        from safetensors.torch import save_file
        save_file(state, str(tmp), metadata={"format": "pt"})
        os.chmod(tmp, _new_file_mode())  # safetensors creates its file 0600; weights are shared like any output
        os.replace(tmp, file)
    else:
        save_torch(state, file)
    return file


def _new_file_mode() -> int:
    """``0o666 & ~umask``: the mode of a file created normally under the process's umask."""
    mask = os.umask(0o022)
    os.umask(mask)
    return 0o666 & ~mask


def _layer_pattern(keys, *, layer_word: str = "layer") -> list[str]:
    """Compress ``...layer.0.x``, ``...layer.1.x`` into ``...layer.{0,1}.x`` for readable reports
    (``layer_word``: the ModuleList's name, ``layer`` in BERT, ``layers`` in the Performer)."""
    groups: dict[str, list[int]] = defaultdict(list)
    for key in keys:
        m = re.search(rf"\.{layer_word}\.(\d+)\.", key)
        if m:
            groups[key[:m.start()] + f".{layer_word}.{{}}." + key[m.end():]].append(int(m.group(1)))
        else:
            groups[key].append(-1)
    out = []
    for pattern, layers in sorted(groups.items()):
        if "{}" in pattern:
            out.append(pattern.replace("{}", "{" + ",".join(map(str, sorted(layers))) + "}"))
        else:
            out.append(pattern)
    return out


def log_loading_report(model: nn.Module, source: str, info: dict, *, is_surprising, layer_word: str = "layer") -> None:
    """One log message saying which keys a checkpoint load initialised anew, re-initialised,
    discarded or dropped: a warning when ``is_surprising(key)`` holds for a new key (a backbone
    weight, not a head or PEFT module) or a shape differed, else info."""
    lines = []
    if info["missing_keys"]:
        lines.append(f"newly initialised (not in the checkpoint): "
                     f"{_layer_pattern(info['missing_keys'], layer_word=layer_word)}")
    if info["mismatched_keys"]:
        lines.append("re-initialised (other shape in the checkpoint): "
                     + ", ".join(f"{k} {a}->{b}" for k, a, b in info["mismatched_keys"]))
    if info.get("discarded_head_keys"):
        lines.append(f"not used (another head's weights): "
                     f"{_layer_pattern(info['discarded_head_keys'], layer_word=layer_word)}")
    if info.get("unexpected_keys"):
        lines.append(f"dropped (no place in the model): "
                     f"{_layer_pattern(info['unexpected_keys'], layer_word=layer_word)}")
    if not lines:
        logger.info("loaded %s into %s: every key matched", source, type(model).__name__)
        return
    surprising = [k for k in info["missing_keys"] if is_surprising(k)]
    level = logging.WARNING if surprising or info["mismatched_keys"] else logging.INFO
    logger.log(level, "loaded %s into %s;\n  %s", source, type(model).__name__, "\n  ".join(lines))


class BertPreTrainedModel(nn.Module):
    """Weight init, ``from_pretrained`` and ``save_pretrained`` shared by every BERT model."""

    config_class = BertConfig
    base_model_prefix = "bert"
    head_prefixes: tuple[str, ...] = ()

    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        if not isinstance(config, BertConfig):
            raise TypeError(f"config must be a BertConfig, got {type(config).__name__}")
        self.config = config
        self.loading_info: dict[str, Any] = {}

    # ------------------------------------------------------------------ init
    def _init_weights(self, module: nn.Module) -> None:
        std = self.config.initializer_range
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, std=std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, std=std)
            if module.padding_idx is not None:
                with torch.no_grad():
                    module.weight[module.padding_idx].zero_()
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)

    def post_init(self) -> None:
        """HF BERT init for the backbone, then each PEFT module's own start (zero updates)."""
        self.apply(self._init_weights)
        for module in self.modules():
            if module is not self and hasattr(module, "reset_peft_parameters"):
                module.reset_peft_parameters()

    def gradient_checkpointing_enable(self) -> None:
        """Recompute each layer's activations in backward: less memory, ~30% more compute."""
        self._encoder().gradient_checkpointing = True

    def gradient_checkpointing_disable(self) -> None:
        self._encoder().gradient_checkpointing = False

    def _encoder(self):
        return self.encoder if hasattr(self, "encoder") else self.bert.encoder

    def num_parameters(self, only_trainable: bool = False) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad or not only_trainable)

    # ------------------------------------------------------------------ loading
    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, *, config: BertConfig | None = None,
                        ignore_mismatched_sizes: bool = False, ignore_unexpected_keys: bool = False,
                        **config_overrides: Any):
        """Load a HuggingFace BERT checkpoint folder.

        Parameters
        ----------
        path
            Folder with ``config.json`` and ``model.safetensors`` or ``pytorch_model.bin``.
        config
            A config to use instead of the folder's ``config.json``.
        ignore_mismatched_sizes
            Re-initialise weights whose shape differs (e.g. a classifier with another number
            of labels) instead of raising.
        ignore_unexpected_keys
            Drop checkpoint keys the model has no place for instead of raising. Weights of
            another BERT head (``cls.``, ``classifier.``, ``bert.pooler.``) are always dropped
            with a log line.
        **config_overrides
            Config keys that replace the folder's (``num_labels=5``, ``prompt_type="lora"`` ...).
        """
        path = Path(path)
        if not path.is_dir():
            raise FileNotFoundError(f"checkpoint folder {path} does not exist")
        weights = find_weights_file(path)
        if config is None:
            config = BertConfig.from_pretrained(path, **config_overrides)
        elif config_overrides:
            config = config.copy(**config_overrides)
        model = cls(config)
        state = read_state_dict(weights)
        model.load_checkpoint_state(state, source=str(weights), ignore_mismatched_sizes=ignore_mismatched_sizes,
                                    ignore_unexpected_keys=ignore_unexpected_keys)
        model.eval()
        return model

    def _normalise_keys(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        has_base = hasattr(self, self.base_model_prefix)
        prefix = self.base_model_prefix + "."
        out: dict[str, torch.Tensor] = {}
        for key, tensor in state.items():
            key = key.replace("LayerNorm.gamma", "LayerNorm.weight").replace("LayerNorm.beta", "LayerNorm.bias")
            key = map_checkpoint_key(key)
            if key.endswith(_BUFFER_KEYS):
                continue
            is_head = key.startswith(_ANY_HEAD_PREFIXES)
            if has_base and not key.startswith(prefix) and not is_head:
                key = prefix + key  # a bare BertModel checkpoint loaded under a head
            elif not has_base and key.startswith(prefix):
                key = key[len(prefix):]  # a headed checkpoint loaded as BertModel
            out[key] = tensor
        bias = out.pop("cls.predictions.decoder.bias", None)
        if bias is not None:
            out.setdefault("cls.predictions.bias", bias)
        return out

    def load_checkpoint_state(self, state: dict[str, torch.Tensor], *, source: str = "state dict",
                              ignore_mismatched_sizes: bool = False, ignore_unexpected_keys: bool = False,
                              report_missing: bool = True) -> dict[str, Any]:
        """Load ``state`` into the model by HF key names and report what happened."""
        state = self._normalise_keys(state)
        own = self.state_dict()
        tied = [k for k in _TIED_KEYS if k in own]
        for key in tied:
            # One tensor in the model: load the word embeddings, never the decoder copy over them.
            source_key = _TIED_KEYS[key]
            if key in state and source_key in state:
                duplicate = state.pop(key)
                if duplicate.shape != state[source_key].shape or not torch.equal(duplicate, state[source_key]):
                    logger.warning("%s: %s differs from %s; the model ties them, so %s is used",
                                   source, key, source_key, source_key)
        unexpected = sorted(k for k in state if k not in own)
        other_heads = [k for k in unexpected if k.startswith(_ANY_HEAD_PREFIXES)
                       or (not hasattr(self, self.base_model_prefix) and k.startswith(("pooler.",)))]
        unexpected = [k for k in unexpected if k not in other_heads]
        if unexpected and not ignore_unexpected_keys:
            raise ValueError(
                f"{source} holds {len(unexpected)} keys that {type(self).__name__} with this config has no "
                f"place for: {_layer_pattern(unexpected)}. Does config.json (prompt_type, num_hidden_layers) "
                "match the checkpoint? Pass ignore_unexpected_keys=True to drop them.")
        mismatched = [(k, tuple(state[k].shape), tuple(own[k].shape)) for k in state
                      if k in own and state[k].shape != own[k].shape]
        if mismatched and not ignore_mismatched_sizes:
            desc = "; ".join(f"{k}: checkpoint {a}, model {b}" for k, a, b in mismatched)
            raise ValueError(
                f"{source}: weights of another shape than the model's: {desc}. For a classifier with "
                "another number of labels pass ignore_mismatched_sizes=True to re-initialise it.")
        reinitialised = {k for k, _, _ in mismatched}
        skip = set(unexpected) | set(other_heads) | reinitialised
        loadable = {k: v for k, v in state.items() if k not in skip}
        result = self.load_state_dict(loadable, strict=False)
        # mismatched keys are in the checkpoint (reported as re-initialised), not missing from it
        missing = sorted(k for k in result.missing_keys if k not in tied and k not in reinitialised)
        self.loading_info = {
            "missing_keys": missing,
            "unexpected_keys": unexpected,
            "discarded_head_keys": other_heads,
            "mismatched_keys": mismatched,
        }
        if report_missing:
            self._report_loading(source)
        return self.loading_info

    def _report_loading(self, source: str) -> None:
        # New backbone weights are suspicious; new heads and PEFT modules are expected.
        log_loading_report(self, source, self.loading_info, is_surprising=lambda k: not any(
            h in k for h in self.head_prefixes) and owner_of(k) is None)

    # ------------------------------------------------------------------ saving
    def save_pretrained(self, directory: str | os.PathLike, *, safe_serialization: bool = True,
                        state_dict: dict[str, torch.Tensor] | None = None, config: BertConfig | None = None) -> Path:
        """Write ``config.json`` and ``model.safetensors`` (or ``pytorch_model.bin``)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        config = config if config is not None else self.config
        config = config.copy(architectures=[type(self).__name__])
        state = self.state_dict() if state_dict is None else dict(state_dict)
        if safe_serialization:
            for key in _TIED_KEYS:
                state.pop(key, None)  # tied to the word embeddings; HF re-ties on load
        elif "cls.predictions.bias" in state:
            state["cls.predictions.decoder.bias"] = state["cls.predictions.bias"]  # as HF 4.x wrote
        write_state_dict(state, directory, safe_serialization=safe_serialization)
        config.save_pretrained(directory)
        return directory
