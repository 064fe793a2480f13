"""Released CellFM checkpoints (MindSpore ``.ckpt``) -> a checkpoint folder of ours, without MindSpore.

The ``.ckpt`` is one protobuf ``Checkpoint`` message, decoded here from the wire format:

- ``Checkpoint``: repeated field 1, a ``Value``; a file may end with a 17-byte trailer that
  starts with ``b"crc_num"`` (newer MindSpore), which is recognised and not checked;
- ``Value``: field 1 the tag (the parameter's name), field 2 a ``TensorProto``;
- ``TensorProto``: field 1 the dims (int64, packed or one by one), field 2 the type name
  (``"Float32"``, ``"Float16"``, ``"Int32"``, ...), field 3 the raw little-endian bytes.

Consecutive values with the same tag are pieces of one tensor, concatenated in order.
:func:`write_mindspore_checkpoint` writes the same format (our tests build checkpoints with it).

:func:`convert_cellfm_checkpoint` keeps the encoder's tensors (``gamma`` / ``beta`` renamed
``weight`` / ``bias``), drops the optimizer moments, the training scalars and the pretraining
decoders with a report of each group, refuses anything else it cannot place, reads the sizes
from the shapes and writes ``config.json`` + ``model.safetensors``.
"""
from __future__ import annotations

import logging
import mmap
import os
import re
import struct
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .configuration_cellfm import CellFMConfig
from .modeling_cellfm import CellFMModel
from .modeling_utils import _layer_pattern

logger = logging.getLogger(__name__)

__all__ = [
    "CheckpointFormatError", "ConversionReport", "cellfm_state_dict", "config_from_cellfm_state",
    "convert_cellfm_checkpoint", "list_mindspore_checkpoint", "plan_cellfm_conversion", "read_mindspore_checkpoint",
    "write_mindspore_checkpoint",
]

CRC_MAGIC = b"crc_num"
CRC_TRAILER_BYTES = 17
#: MindSpore's tensor type names -> numpy dtype (little-endian); BFloat16 is widened on read
DTYPES: dict[str, str] = {
    "Float16": "<f2", "Float32": "<f4", "Float64": "<f8", "BFloat16": "<u2",
    "Int8": "i1", "Int16": "<i2", "Int32": "<i4", "Int64": "<i8",
    "UInt8": "u1", "UInt16": "<u2", "UInt32": "<u4", "UInt64": "<u8", "Bool": "?",
}
_TYPE_NAMES = {np.dtype(v): k for k, v in DTYPES.items() if k != "BFloat16"}

#: the released encoder's names (``{i}``: a layer), ours after the rename
_TOP_KEYS = ("gene_emb", "cls_token", "value_enc.mask_emb", "value_enc.value_enc.a", "value_enc.value_enc.w1.weight",
             "value_enc.value_enc.w3.weight", "value_enc.value_enc.table.weight")
_LAYER_KEY = re.compile(r"^encoder\.(\d+)\.(attn\.[qkvuo]_proj\.weight|ffn\.[uvo]_proj\.weight|"
                        r"post_norm[12]\.(gamma|beta|weight|bias))$")
#: groups of released entries with no place in the encoder, dropped with a report
_OPTIMIZER = re.compile(r"^(moment1|moment2|moments|accum|adam_m|adam_v)\.")
_PRETRAINING = re.compile(r"^(zero_emb|value_dec|cellwise_dec|ST_emb|ST_enc)(\.|$)")
#: the release's head dim (1536 dims / 48 heads), assumed when no number of heads is given
RELEASED_HEAD_DIM = 32


class CheckpointFormatError(ValueError):
    """The file is not a MindSpore checkpoint, or one this reader cannot place."""


# ----------------------------------------------------------------------------- wire format
def _varint(buf, pos: int, end: int, path: Path) -> tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= end or shift > 63:
            raise CheckpointFormatError(f"{path}: not a MindSpore checkpoint (a protobuf varint runs past byte "
                                        f"{pos}); expected a .ckpt written by mindspore.save_checkpoint")
        byte = buf[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        shift += 7
        if byte < 0x80:
            return result, pos


def _fields(buf, start: int, end: int, path: Path, what: str) -> Iterator[tuple[int, int, Any]]:
    """(field number, wire type, value) of the message in ``buf[start:end]``; a length-delimited
    value is given as its (start, end) span."""
    pos = start
    while pos < end:
        key, pos = _varint(buf, pos, end, path)
        number, wire = key >> 3, key & 7
        if number == 0:
            raise CheckpointFormatError(f"{path}: not a MindSpore checkpoint (field number 0 in a {what} at byte "
                                        f"{pos}); expected a .ckpt written by mindspore.save_checkpoint")
        if wire == 0:
            value, pos = _varint(buf, pos, end, path)
            yield number, wire, value
        elif wire == 2:
            length, pos = _varint(buf, pos, end, path)
            if pos + length > end:
                raise CheckpointFormatError(f"{path}: truncated or not a MindSpore checkpoint (a {what} field of "
                                            f"{length} bytes at byte {pos} runs past its end {end})")
            yield number, wire, (pos, pos + length)
            pos += length
        elif wire in (1, 5):
            size = 8 if wire == 1 else 4
            if pos + size > end:
                raise CheckpointFormatError(f"{path}: truncated or not a MindSpore checkpoint (at byte {pos})")
            yield number, wire, bytes(buf[pos:pos + size])
            pos += size
        else:
            raise CheckpointFormatError(f"{path}: not a MindSpore checkpoint (protobuf wire type {wire} in a {what} "
                                        f"at byte {pos}); expected a .ckpt written by mindspore.save_checkpoint")


@dataclass
class _Piece:
    tag: str
    dims: list[int]
    type_name: str
    span: tuple[int, int]


def _read_value(buf, span: tuple[int, int], path: Path) -> _Piece:
    tag = None
    tensor = None
    for number, wire, value in _fields(buf, span[0], span[1], path, "Value"):
        if number == 1 and wire == 2:
            try:
                tag = bytes(buf[value[0]:value[1]]).decode("utf-8")
            except UnicodeDecodeError as err:
                raise CheckpointFormatError(f"{path}: not a MindSpore checkpoint (a tag at byte {value[0]} is not "
                                            "UTF-8 text)") from err
        elif number == 2 and wire == 2:
            tensor = value
    if tag is None or tensor is None:
        raise CheckpointFormatError(f"{path}: a Value at byte {span[0]} has no {'tag' if tag is None else 'tensor'} "
                                    f"({tag!r}); expected tag + TensorProto as mindspore.save_checkpoint writes")
    dims: list[int] = []
    type_name = None
    content = (tensor[0], tensor[0])
    for number, wire, value in _fields(buf, tensor[0], tensor[1], path, "TensorProto"):
        if number == 1 and wire == 0:
            dims.append(value)
        elif number == 1 and wire == 2:  # packed dims
            pos = value[0]
            while pos < value[1]:
                dim, pos = _varint(buf, pos, value[1], path)
                dims.append(dim)
        elif number == 2 and wire == 2:
            type_name = bytes(buf[value[0]:value[1]]).decode("utf-8", errors="replace")
        elif number == 3 and wire == 2:
            content = value
    if type_name not in DTYPES:
        raise CheckpointFormatError(f"{path}: tensor {tag!r} has type {type_name!r}; expected one of {list(DTYPES)}")
    return _Piece(tag, dims, type_name, content)


def _assemble(pieces: list[_Piece], buf, path: Path) -> np.ndarray:
    first = pieces[0]
    dtype = np.dtype(DTYPES[first.type_name])
    if any(p.type_name != first.type_name for p in pieces):
        raise CheckpointFormatError(f"{path}: the pieces of tensor {first.tag!r} have types "
                                    f"{sorted({p.type_name for p in pieces})}; expected one")
    raw = b"".join(bytes(buf[p.span[0]:p.span[1]]) for p in pieces)
    if len(raw) % dtype.itemsize:
        raise CheckpointFormatError(f"{path}: tensor {first.tag!r} holds {len(raw)} bytes, not a multiple of "
                                    f"{dtype.itemsize} ({first.type_name})")
    array = np.frombuffer(raw, dtype=dtype)
    n = array.size
    shape = list(first.dims)
    if int(np.prod(shape, dtype=np.int64)) != n and len(pieces) > 1 and all(
            len(p.dims) == len(shape) and p.dims[1:] == shape[1:] for p in pieces) and shape:
        shape = [sum(p.dims[0] for p in pieces)] + shape[1:]  # pieces cut along the first axis
    if int(np.prod(shape, dtype=np.int64)) != n:
        raise CheckpointFormatError(f"{path}: tensor {first.tag!r} has dims {first.dims} but {n} values "
                                    f"({len(pieces)} piece(s)); expected as many values as the dims give")
    array = array.reshape(shape)
    if first.type_name == "BFloat16":
        array = (array.astype(np.uint32) << 16).view(np.float32)
    return array.copy()


def _scan(path: Path, buf, size: int) -> list[list[_Piece]]:
    """The pieces of every tensor, grouped by tag, in file order (nothing decoded beyond headers)."""
    end = size
    if size >= CRC_TRAILER_BYTES and buf[size - CRC_TRAILER_BYTES:size - CRC_TRAILER_BYTES + len(CRC_MAGIC)] \
            == CRC_MAGIC:
        end = size - CRC_TRAILER_BYTES
        logger.info("%s: ends with a crc_num trailer (not checked)", path)
    groups: list[list[_Piece]] = []
    seen: set[str] = set()
    for number, wire, value in _fields(buf, 0, end, path, "Checkpoint"):
        if number != 1 or wire != 2:
            raise CheckpointFormatError(f"{path}: not a MindSpore checkpoint (top-level field {number}, wire "
                                        f"type {wire}); expected repeated Value messages (field 1)")
        piece = _read_value(buf, value, path)
        if groups and groups[-1][0].tag == piece.tag:
            groups[-1].append(piece)
            continue
        if piece.tag in seen:
            raise CheckpointFormatError(f"{path}: tensor {piece.tag!r} appears twice, not in consecutive pieces; "
                                        "expected each tag once")
        seen.add(piece.tag)
        groups.append([piece])
    if not groups:
        raise CheckpointFormatError(f"{path}: holds no tensors; expected a MindSpore .ckpt")
    return groups


def _open(path: str | os.PathLike) -> tuple[Path, int]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"--checkpoint {path} does not exist; expected a MindSpore .ckpt file")
    size = path.stat().st_size
    if size == 0:
        raise CheckpointFormatError(f"{path}: empty file; expected a MindSpore .ckpt written by save_checkpoint")
    return path, size


def list_mindspore_checkpoint(path: str | os.PathLike) -> dict[str, int]:
    """The tags of a MindSpore ``.ckpt`` and the number of values of each, in file order, without
    reading the values (an optimizer's moments need not be loaded to be dropped).

    Raises
    ------
    FileNotFoundError, CheckpointFormatError
        As :func:`read_mindspore_checkpoint`.
    """
    path, size = _open(path)
    with open(path, "rb") as handle, mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as buf:
        groups = _scan(path, buf, size)
    return {g[0].tag: sum(p.span[1] - p.span[0] for p in g) // np.dtype(DTYPES[g[0].type_name]).itemsize
            for g in groups}


def read_mindspore_checkpoint(path: str | os.PathLike, *, select: Callable[[str], bool] | None = None
                              ) -> dict[str, np.ndarray]:
    """The tensors of a MindSpore ``.ckpt``, by tag, in file order (pieces concatenated).

    Parameters
    ----------
    path
        The checkpoint file.
    select
        Read only the tags for which ``select(tag)`` is true (the whole file is still checked);
        ``None``: every tensor.

    Returns
    -------
    dict
        Tag -> numpy array (its own copy).

    Raises
    ------
    FileNotFoundError
        If ``path`` is not a file.
    CheckpointFormatError
        If the file is not a MindSpore checkpoint (the message names it and where reading failed).
    """
    path, size = _open(path)
    with open(path, "rb") as handle, mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as buf:
        return {pieces[0].tag: _assemble(pieces, buf, path) for pieces in _scan(path, buf, size)
                if select is None or select(pieces[0].tag)}


def _encode_varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _field(number: int, payload: bytes) -> bytes:
    return _encode_varint(number << 3 | 2) + _encode_varint(len(payload)) + payload


def write_mindspore_checkpoint(path: str | os.PathLike, tensors: Mapping[str, Any], *, piece_bytes: int | None = None,
                               packed_dims: bool = False, crc_trailer: bool = False) -> Path:
    """Write ``tensors`` as a MindSpore ``.ckpt`` (the format :func:`read_mindspore_checkpoint` reads).

    Parameters
    ----------
    path
        The file to write.
    tensors
        Tag -> array (numpy or torch; float32, float16, int32 ...).
    piece_bytes
        Split a tensor's bytes into pieces of at most this many bytes (each a ``Value`` with the
        tensor's tag and dims), as MindSpore does for large tensors; ``None``: one piece each.
    packed_dims
        Write the dims packed (one length-delimited field) rather than one field each.
    crc_trailer
        End with a 17-byte ``crc_num`` trailer (its number is not a real checksum).

    Returns
    -------
    pathlib.Path
        ``path``.
    """
    path = Path(path)
    with open(path, "wb") as handle:
        for tag, value in tensors.items():
            array = value.detach().cpu().numpy() if torch.is_tensor(value) else np.asarray(value)
            array = np.asarray(array, order="C")
            le = array.dtype.newbyteorder("<") if array.dtype.byteorder == ">" else array.dtype
            type_name = _TYPE_NAMES.get(np.dtype(le))
            if type_name is None:
                raise ValueError(f"tensor {tag!r}: dtype {array.dtype} has no MindSpore type name here")
            raw = array.astype(le, copy=False).tobytes()
            if packed_dims:
                dims = _field(1, b"".join(_encode_varint(d) for d in array.shape))
            else:
                dims = b"".join(_encode_varint(1 << 3) + _encode_varint(d) for d in array.shape)
            step = piece_bytes or max(len(raw), 1)
            step -= step % array.dtype.itemsize or 0
            step = max(step, array.dtype.itemsize)
            for start in range(0, max(len(raw), 1), step):
                proto = dims + _field(2, type_name.encode()) + _field(3, raw[start:start + step])
                handle.write(_field(1, _field(1, tag.encode("utf-8")) + _field(2, proto)))
        if crc_trailer:
            handle.write(CRC_MAGIC + struct.pack("<Q", 0) + b"\x00\x00")
    return path


# ----------------------------------------------------------------------------- key mapping
@dataclass
class ConversionReport:
    """What became of each entry of a released checkpoint.

    Attributes
    ----------
    kept
        Released tag -> our key.
    dropped
        Reason (``"optimizer moments"``, ``"training scalars"``, ``"pretraining only"``,
        ``"unknown"``) -> released tags.
    """

    kept: dict[str, str] = field(default_factory=dict)
    dropped: dict[str, list[str]] = field(default_factory=dict)

    def lines(self) -> list[str]:
        out = [f"kept {len(self.kept)} tensors of the encoder"]
        for reason, tags in self.dropped.items():
            shown = _layer_pattern(tags, layer_word="encoder")
            out.append(f"dropped {len(tags)} ({reason}): {', '.join(shown[:12])}{' ...' if len(shown) > 12 else ''}")
        return out


def _strip_wrapper(tensors: Mapping[str, np.ndarray]) -> str:
    """The prefix a training wrapper puts before the network's names (``""`` when none)."""
    if "gene_emb" in tensors:
        return ""
    candidates = sorted(k[:-len("gene_emb")] for k in tensors
                        if k.endswith(".gene_emb") and not _OPTIMIZER.match(k))
    return candidates[0] if len(candidates) == 1 else ""


def plan_cellfm_conversion(sizes: Mapping[str, int], *, source: str = "checkpoint",
                           drop_unknown: bool = False) -> ConversionReport:
    """What becomes of each entry of a released checkpoint, from its tags and sizes alone.

    Parameters
    ----------
    sizes
        Tag -> number of values, as :func:`list_mindspore_checkpoint` returns.
    source
        Named in messages.
    drop_unknown
        Drop entries that are none of the known groups (reported as ``"unknown"``) instead of raising.

    Raises
    ------
    CheckpointFormatError
        If the encoder's tensors are not there, or an entry is unknown and ``drop_unknown`` is false.
    """
    prefix = _strip_wrapper(sizes)
    report = ConversionReport()
    for tag, size in sizes.items():
        name = tag[len(prefix):] if prefix and tag.startswith(prefix) else tag
        match = _LAYER_KEY.match(name)
        if name in _TOP_KEYS or match:
            report.kept[tag] = name.replace(".gamma", ".weight").replace(".beta", ".bias") if match else name
            continue
        if _OPTIMIZER.match(tag):
            reason = "optimizer moments"
        elif _PRETRAINING.match(name):
            reason = "pretraining only"
        elif size <= 1:
            reason = "training scalars"
        else:
            reason = "unknown"
        report.dropped.setdefault(reason, []).append(tag)
    unknown = report.dropped.get("unknown", [])
    if unknown and not drop_unknown:
        raise CheckpointFormatError(f"{source}: {len(unknown)} entries are neither CellFM encoder weights nor "
                                    f"optimizer state, training scalars or pretraining decoders: "
                                    f"{_layer_pattern(unknown, layer_word='encoder')[:12]}; pass --drop_unknown "
                                    "to convert without them")
    missing = [k for k in _TOP_KEYS if k not in report.kept.values()]
    if missing:
        raise CheckpointFormatError(f"{source}: no {missing} among its {len(sizes)} tensors; expected a CellFM "
                                    "checkpoint (gene_emb, cls_token, value_enc.*, encoder.N.*)")
    return report


def cellfm_state_dict(tensors: Mapping[str, np.ndarray], *, source: str = "checkpoint",
                      drop_unknown: bool = False) -> tuple[dict[str, torch.Tensor], ConversionReport]:
    """Our state dict from a released checkpoint's tensors, and what was dropped
    (:func:`plan_cellfm_conversion` applied to ``tensors``, tag -> array)."""
    report = plan_cellfm_conversion({k: int(np.asarray(v).size) for k, v in tensors.items()}, source=source,
                                    drop_unknown=drop_unknown)
    return {ours: torch.from_numpy(np.asarray(tensors[tag])) for tag, ours in report.kept.items()}, report


def config_from_cellfm_state(state: Mapping[str, torch.Tensor], *, source: str = "checkpoint",
                             num_attention_heads: int | None = None, **overrides: Any) -> CellFMConfig:
    """The config whose sizes fit ``state`` (our names).

    Parameters
    ----------
    state
        The encoder's tensors in our names.
    source
        Named in messages.
    num_attention_heads
        Not readable from the shapes; ``None``: the release's head dim of 32 (1536 dims -> 48 heads).
    **overrides
        Further config keys.
    """
    vocab_size, hidden = state["gene_emb"].shape
    layers = sorted({int(m.group(1)) for k in state if (m := re.match(r"^encoder\.(\d+)\.", k))})
    if not layers or layers != list(range(len(layers))):
        raise CheckpointFormatError(f"{source}: encoder layer indices {layers}; expected encoder.0 .. N-1")
    first = "encoder.0."
    needed = [first + f"attn.{p}_proj.weight" for p in "qkvuo"] + [first + f"ffn.{p}_proj.weight" for p in "uvo"]
    absent = [k for k in needed if k not in state]
    if absent:
        raise CheckpointFormatError(f"{source}: no {absent}; expected every projection of a CellFM layer")
    if num_attention_heads is None:
        if hidden % RELEASED_HEAD_DIM:
            raise CheckpointFormatError(f"{source}: {hidden} dims is not a multiple of the release's head dim "
                                        f"{RELEASED_HEAD_DIM}; give the number of heads (--num_attention_heads)")
        num_attention_heads = hidden // RELEASED_HEAD_DIM
        logger.info("%s: number of heads not given; %d (head dim %d, as the release)", source, num_attention_heads,
                    RELEASED_HEAD_DIM)
    return CellFMConfig(vocab_size=int(vocab_size), hidden_size=int(hidden), num_hidden_layers=len(layers),
                        num_attention_heads=int(num_attention_heads),
                        intermediate_size=int(state[first + "ffn.u_proj.weight"].shape[0]),
                        value_slots=int(state["value_enc.value_enc.w1.weight"].shape[0]), **overrides)


def convert_cellfm_checkpoint(checkpoint: str | os.PathLike, output_dir: str | os.PathLike, *,
                              num_attention_heads: int | None = None, drop_unknown: bool = False,
                              **config_overrides: Any) -> ConversionReport:
    """Convert a released CellFM ``.ckpt`` into ``output_dir`` (``config.json`` + ``model.safetensors``).

    Parameters
    ----------
    checkpoint
        The MindSpore checkpoint.
    output_dir
        The folder to write into (created if missing; the caller makes it atomic).
    num_attention_heads
        The model's number of heads (``None``: head dim 32, as the release).
    drop_unknown
        Convert even when entries of no known group are there (reported).
    **config_overrides
        Further config keys (``max_genes``, ...).

    Returns
    -------
    ConversionReport
        What was kept and what dropped (also logged).
    """
    source = str(checkpoint)
    report = plan_cellfm_conversion(list_mindspore_checkpoint(checkpoint), source=source, drop_unknown=drop_unknown)
    tensors = read_mindspore_checkpoint(checkpoint, select=report.kept.__contains__)  # moments are never loaded
    state = {ours: torch.from_numpy(tensors.pop(tag)) for tag, ours in report.kept.items()}
    config = config_from_cellfm_state(state, source=source, num_attention_heads=num_attention_heads,
                                      **config_overrides)
    casts = sorted({str(v.dtype) for v in state.values() if v.dtype != torch.float32})
    if casts:
        logger.info("%s: casting %s tensors to float32", source, ", ".join(casts))
    state = {k: v.float() for k, v in state.items()}
    model = CellFMModel(config)
    info = model.load_checkpoint_state(state, source=source, report_missing=False)
    if info["missing_keys"] or info["mismatched_keys"]:
        raise CheckpointFormatError(f"{source}: did not convert cleanly: missing {info['missing_keys']}, other "
                                    f"shapes {info['mismatched_keys']}")
    model.save_pretrained(output_dir)
    for line in report.lines():
        logger.info("%s: %s", source, line)
    logger.info("converted %s -> %s (%d gene rows with the pad row 0, dim %d, %d layers, %d heads)", source,
                output_dir, config.vocab_size, config.hidden_size, config.num_hidden_layers, config.num_attention_heads)
    return report
