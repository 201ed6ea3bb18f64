"""Reading safetensors headers and writing safetensors files tensor by tensor, in bounded memory.

The format (https://github.com/huggingface/safetensors): 8 bytes little-endian ``N``, then ``N`` bytes of
JSON mapping each tensor name to ``{"dtype", "shape", "data_offsets": [begin, end]}`` (offsets into the
data that follows the header) plus an optional ``"__metadata__"`` string map, padded with spaces to a
multiple of 8; then the raw little-endian tensor bytes, back to back.

Why a hand-written writer: ``safetensors.torch.save_file`` (and ``save_pretrained``) needs every tensor
of a shard in memory at once, so peak memory grows with the shard (5-50 GB for the checkpoints moekit
edits). A safetensors file is simple enough to write as it is read: the header is known once the
output tensors' names, dtypes and shapes are planned, and the bytes are then copied range by range
from the source files through one fixed buffer (or ``os.copy_file_range`` in the kernel). Reading goes
through plain file reads of byte ranges rather than ``safe_open``'s memory map, for the same reason:
pages of a memory-mapped file that are touched count in the process's resident memory until unmapped,
so mapping a 5 GB shard looks (and, under memory pressure, acts) like holding it. Bytes are never
decoded, so every dtype (bf16, FP8, ...) passes through unchanged. ``safe_open`` still validates each
source header before anything is written, and the tests read every written file back with it.
"""

from __future__ import annotations

import json
import math
import os
import struct
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from moekit.model_io import ModelLoadError

# Bytes per element: to order a file's tensors so that each starts aligned to its element size (as
# safetensors itself orders them), and to check a stored size against its shape. The sizes of the data
# always come from the header's offsets; a dtype not listed here (sub-byte formats) skips the size check.
DTYPE_SIZES = {"F64": 8, "I64": 8, "U64": 8, "C64": 8, "F32": 4, "I32": 4, "U32": 4, "F16": 2, "BF16": 2,
               "I16": 2, "U16": 2, "I8": 1, "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1, "F8_E8M0": 1}
MAX_HEADER = 100 * 2**20  # safetensors refuses larger headers too
COPY_BUFFER = 8 * 2**20


@dataclass(frozen=True)
class TensorInfo:
    """One tensor of a safetensors file: where its bytes are (absolute file offsets)."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    path: Path
    begin: int  # absolute offset of the first byte in the file
    nbytes: int

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass(frozen=True)
class Piece:
    """A byte range of a source file, copied unchanged into an output tensor."""

    path: Path
    offset: int
    length: int


@dataclass
class OutputTensor:
    """A tensor to write: its header entry and the source byte ranges that make its data, in order."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    pieces: list[Piece]

    @property
    def nbytes(self) -> int:
        return sum(p.length for p in self.pieces)


def read_header(path: Path) -> list[TensorInfo]:
    """The tensors of one safetensors file, in data order; a ``ModelLoadError`` naming the file if its
    header is unreadable or promises more bytes than the file has (a truncated download)."""
    size = path.stat().st_size
    where = f"cannot load the weights of {path.parent}: {path.name}"
    with path.open("rb") as handle:
        head = handle.read(8)
        if len(head) < 8:
            raise ModelLoadError(f"{where} is {size} bytes, too short to be a safetensors file (truncated?)")
        (length,) = struct.unpack("<Q", head)
        if length > min(MAX_HEADER, size - 8):
            raise ModelLoadError(f"{where} has a {length}-byte header but the file is {size} bytes: it is truncated "
                                 "or not a safetensors file (download or copy it again)")
        try:
            header = json.loads(handle.read(length))
        except (UnicodeDecodeError, ValueError) as err:
            raise ModelLoadError(f"{where} has an unreadable header ({err}); the file is corrupt") from None
    if not isinstance(header, dict):
        raise ModelLoadError(f"{where} has a header that is not a JSON object; the file is corrupt")
    start, data = 8 + length, size - 8 - length
    tensors = []
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        try:
            begin, end = (int(x) for x in entry["data_offsets"])
            info = TensorInfo(name, str(entry["dtype"]), tuple(int(d) for d in entry["shape"]), path, start + begin,
                              end - begin)
        except (KeyError, TypeError, ValueError):
            raise ModelLoadError(f"{where}: the header entry of {name!r} is malformed; the file is corrupt") from None
        if not 0 <= begin <= end <= data:
            raise ModelLoadError(f"{where}: tensor {name!r} lies at bytes {begin}..{end} of the data but the file "
                                 f"holds {data}: it is truncated (download or copy it again)")
        tensors.append(info)
    tensors.sort(key=lambda t: t.begin)
    _check_layout(tensors, start, data, where)
    return tensors


def _check_layout(tensors: list[TensorInfo], start: int, data: int, where: str) -> None:
    """The checks safetensors makes when it opens a file, without mapping the file into memory (a whole-shard
    mapping would count against an address-space limit): every size matching its dtype and shape, the tensors
    back to back from the start of the data to its end."""
    expected = start
    for info in tensors:
        size = DTYPE_SIZES.get(info.dtype)
        if any(d < 0 for d in info.shape):
            raise ModelLoadError(f"{where}: tensor {info.name!r} has a negative dimension; the file is corrupt")
        numel = info.numel
        if size is not None and numel * size != info.nbytes:
            raise ModelLoadError(f"{where} is not a valid safetensors file: tensor {info.name!r} of shape "
                                 f"{list(info.shape)} and dtype {info.dtype} needs {numel * size} bytes but its "
                                 f"offsets hold {info.nbytes}")
        if info.begin != expected:
            raise ModelLoadError(f"{where} is not a valid safetensors file: the data of {info.name!r} does not "
                                 "follow the tensor before it (gap or overlap)")
        expected = info.begin + info.nbytes
    if expected != start + data:
        raise ModelLoadError(f"{where} is not a valid safetensors file: its tensors hold {expected - start} bytes "
                             f"but its data section is {data} bytes")


def merge_pieces(pieces: Iterable[Piece]) -> list[Piece]:
    """Join byte ranges that follow each other in the same file (fewer, larger copies)."""
    merged: list[Piece] = []
    for piece in pieces:
        last = merged[-1] if merged else None
        if last is not None and last.path == piece.path and last.offset + last.length == piece.offset:
            merged[-1] = Piece(last.path, last.offset, last.length + piece.length)
        elif piece.length:
            merged.append(piece)
    return merged


def _file_order(tensors: list[OutputTensor]) -> list[OutputTensor]:
    """Wider elements first, as safetensors writes them, so that every tensor starts aligned."""
    return sorted(tensors, key=lambda t: -DTYPE_SIZES.get(t.dtype, 1))


def encode_header(tensors: list[OutputTensor], metadata: dict[str, str] | None = None) -> bytes:
    """The 8-byte length and the space-padded JSON header of a file holding ``tensors`` in this order."""
    header: dict[str, object] = {"__metadata__": metadata or {"format": "pt"}}
    offset = 0
    for tensor in tensors:
        header[tensor.name] = {"dtype": tensor.dtype, "shape": list(tensor.shape),
                               "data_offsets": [offset, offset + tensor.nbytes]}
        offset += tensor.nbytes
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text


class _Sources:
    """Open source files, one unbuffered descriptor each, reused across tensors."""

    def __init__(self) -> None:
        self.handles: dict[Path, BinaryIO] = {}

    def get(self, path: Path) -> BinaryIO:
        if path not in self.handles:
            self.handles[path] = path.open("rb", buffering=0)
        return self.handles[path]

    def close(self) -> None:
        for handle in self.handles.values():
            handle.close()
        self.handles.clear()


def _write_all(fd: int, data: bytes | memoryview) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def _copy(src: BinaryIO, fd: int, offset: int, length: int, buffer: memoryview) -> None:
    """Append ``length`` bytes at ``offset`` of ``src`` to the file open at descriptor ``fd``: in the kernel
    (``copy_file_range``) where it can, else through ``buffer``."""
    copy_range = getattr(os, "copy_file_range", None)
    while length and copy_range is not None:
        try:
            done = copy_range(src.fileno(), fd, length, offset)
        except OSError:  # e.g. across file systems on older kernels: copy through the buffer
            break
        if done == 0:
            raise ModelLoadError(f"{src.name} ended early: it is shorter than its header says")
        offset, length = offset + done, length - done
    while length:
        view = buffer[: min(length, len(buffer))]
        if hasattr(os, "preadv"):
            done = os.preadv(src.fileno(), [view], offset)
        else:
            src.seek(offset)
            done = src.readinto(view) or 0
        if not done:
            raise ModelLoadError(f"{src.name} ended early: it is shorter than its header says")
        _write_all(fd, view[:done])
        offset, length = offset + done, length - done


def write_safetensors(path: Path, tensors: list[OutputTensor], sources: _Sources | None = None) -> None:
    """Write ``tensors`` to a new safetensors file at ``path``, copying each one's pieces in turn; memory
    stays at one copy buffer whatever the tensors' sizes."""
    own = sources is None
    sources = sources or _Sources()
    ordered = _file_order(tensors)
    buffer = memoryview(bytearray(COPY_BUFFER))
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        _write_all(fd, encode_header(ordered))
        for tensor in ordered:
            for piece in tensor.pieces:
                _copy(sources.get(piece.path), fd, piece.offset, piece.length, buffer)
    finally:
        os.close(fd)
        if own:
            sources.close()


def plan_shards(tensors: list[OutputTensor], max_shard_size: int) -> list[list[OutputTensor]]:
    """Split ``tensors`` (in order) into shards of at most ``max_shard_size`` bytes; a tensor larger than
    that gets a shard of its own, as transformers does."""
    shards: list[list[OutputTensor]] = [[]]
    size = 0
    for tensor in tensors:
        if shards[-1] and size + tensor.nbytes > max_shard_size:
            shards.append([])
            size = 0
        shards[-1].append(tensor)
        size += tensor.nbytes
    return [s for s in shards if s] or [[]]


def write_sharded(directory: Path, tensors: list[OutputTensor], max_shard_size: int) -> list[str]:
    """Write ``tensors`` as ``model.safetensors``, or as ``model-0000i-of-0000n.safetensors`` shards plus
    ``model.safetensors.index.json`` when they exceed ``max_shard_size``; return the file names."""
    shards = plan_shards(tensors, max_shard_size)
    if len(shards) == 1:
        names = ["model.safetensors"]
    else:
        names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    sources = _Sources()
    try:
        for name, shard in zip(names, shards, strict=True):
            write_safetensors(directory / name, shard, sources)
    finally:
        sources.close()
    if len(shards) > 1:
        total_size = sum(t.nbytes for t in tensors)
        weight_map = {t.name: name for name, shard in zip(names, shards, strict=True) for t in shard}
        index = {"metadata": {"total_size": total_size}, "weight_map": dict(sorted(weight_map.items()))}
        (directory / "model.safetensors.index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    return names
