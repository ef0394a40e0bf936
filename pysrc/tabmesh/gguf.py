"""GGUF header, metadata and tensor table: parsed from a prefix of the file, validated
before anything is allocated, so a node can fetch only the byte ranges of the layers it
runs (HTTP Range). Pure Python + numpy; runs in Pyodide. Dequantization is in quants.py.

File layout (GGUF v2 and v3; everything little-endian; big-endian v3 files are refused):

    u32 magic = "GGUF"  | u32 version (2 or 3) | u64 n_tensors | u64 n_kv
    n_kv      x { string key | u32 value_type | value }
    n_tensors x { string name | u32 n_dims | u64 ne[n_dims] | u32 ggml_type | u64 offset }
    zero padding up to a multiple of `alignment` (key general.alignment, u32, default 32)
    tensor data: tensor t at data_offset + t.offset (offset a multiple of alignment)

    string = u64 n_bytes, then UTF-8 bytes (no NUL)
    value  = scalar of value_type (see ValueType) | string
           | array: u32 item_type, u64 count, count items (arrays of arrays are refused,
             as llama.cpp does)
    ne[0] is the fastest-varying dimension: a [rows, cols] weight has ne = (cols, rows).

Metadata values in Python: integers -> int, FLOAT32/FLOAT64 -> float, BOOL -> bool,
STRING -> str; an array of strings -> list[str]; an array of numbers or bools -> a 1-D
numpy array of the stored dtype (int32 token types, float32 scores, ...). Strings are
decoded as UTF-8 with errors="surrogateescape": invalid bytes survive as lone surrogates
and ``s.encode("utf-8", "surrogateescape")`` gives back the stored bytes.
Keys and tensor names must be valid UTF-8.

Bounds (a hostile file is refused before any buffer is sized from its counts):
every count is also checked against the bytes left in the file (each item takes at least
its minimum encoded size), and see the MAX_* constants below.
"""

from __future__ import annotations

import os
import re
import struct
from dataclasses import dataclass, field
from enum import IntEnum
from typing import Any, Iterable

import numpy as np

from .errors import GGUFError, NeedMoreData
from .quants import TYPE_SIZES, format_for, tensor_nbytes, type_name

__all__ = [
    "GGUFError", "NeedMoreData", "ValueType", "TensorInfo", "GGUFFile",
    "parse_header", "read_gguf_path", "read_tensor_bytes", "http_range",
]

GGUF_MAGIC = b"GGUF"
SUPPORTED_VERSIONS = (2, 3)
DEFAULT_ALIGNMENT = 32
ALIGNMENT_KEY = "general.alignment"

MAX_STRING_BYTES = 1 << 20  # any one metadata string or string array item: 1 MiB
MAX_KEY_BYTES = 65535  # metadata key (GGUF spec bound)
MAX_TENSOR_NAME_BYTES = 255  # llama.cpp itself stops at 63
MAX_ARRAY_ITEMS = 1 << 24  # 16 Mi items in one metadata array (vocabularies are < 1 Mi)
MAX_KV = 1 << 16  # metadata entries (real files: < 100)
MAX_TENSORS = 1 << 20  # tensor infos (real files: hundreds to a few thousand)
MAX_DIMS = 4  # GGML_MAX_DIMS
INT64_MAX = (1 << 63) - 1

_MIN_KV_BYTES = 8 + 1 + 4 + 1  # key length, 1-byte key, value type, smallest value
_MIN_TENSOR_INFO_BYTES = 8 + 1 + 4 + 8 + 4 + 8  # name length, 1-byte name, n_dims, ne[0], type, offset


class ValueType(IntEnum):
    UINT8 = 0
    INT8 = 1
    UINT16 = 2
    INT16 = 3
    UINT32 = 4
    INT32 = 5
    FLOAT32 = 6
    BOOL = 7
    STRING = 8
    ARRAY = 9
    UINT64 = 10
    INT64 = 11
    FLOAT64 = 12


_SCALAR_STRUCT = {
    ValueType.UINT8: struct.Struct("<B"), ValueType.INT8: struct.Struct("<b"),
    ValueType.UINT16: struct.Struct("<H"), ValueType.INT16: struct.Struct("<h"),
    ValueType.UINT32: struct.Struct("<I"), ValueType.INT32: struct.Struct("<i"),
    ValueType.FLOAT32: struct.Struct("<f"), ValueType.BOOL: struct.Struct("<B"),
    ValueType.UINT64: struct.Struct("<Q"), ValueType.INT64: struct.Struct("<q"),
    ValueType.FLOAT64: struct.Struct("<d"),
}
_ARRAY_DTYPE = {
    ValueType.UINT8: "<u1", ValueType.INT8: "<i1", ValueType.UINT16: "<u2",
    ValueType.INT16: "<i2", ValueType.UINT32: "<u4", ValueType.INT32: "<i4",
    ValueType.FLOAT32: "<f4", ValueType.BOOL: "<u1", ValueType.UINT64: "<u8",
    ValueType.INT64: "<i8", ValueType.FLOAT64: "<f8",
}
_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")
_LAYER_RE = re.compile(r"blk\.(\d+)\.")


@dataclass(frozen=True)
class TensorInfo:
    """One entry of the tensor table.

    shape: ne as GGUF stores it, ne[0] fastest (a [rows, cols] weight is (cols, rows)).
    offset: absolute byte offset in the file. nbytes: bytes of its data.
    """

    name: str
    shape: tuple[int, ...]
    ggml_type: int
    offset: int
    nbytes: int

    @property
    def end(self) -> int:
        return self.offset + self.nbytes

    @property
    def n_elements(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n

    @property
    def np_shape(self) -> tuple[int, ...]:
        """numpy (row-major) shape: reversed ne, e.g. (rows, cols)."""
        return tuple(reversed(self.shape))

    @property
    def type_name(self) -> str:
        return type_name(self.ggml_type)


@dataclass
class GGUFFile:
    """A parsed GGUF header. Holds no tensor data."""

    version: int
    alignment: int
    metadata: dict[str, Any]
    # (value type, item type or None) of each metadata key, for writers and type checks
    value_types: dict[str, tuple[ValueType, ValueType | None]]
    tensors: dict[str, TensorInfo]  # in file order
    data_offset: int  # absolute offset of the tensor data section
    file_size: int
    header_size: int = field(default=0)  # bytes of header parsed (end of the tensor table)

    @property
    def arch(self) -> str:
        arch = self.metadata.get("general.architecture")
        if not isinstance(arch, str):
            raise GGUFError("metadata key 'general.architecture' is missing or not a string; "
                            "the file was not written by a llama.cpp converter")
        return arch

    def get(self, key: str, default: Any = None) -> Any:
        return self.metadata.get(key, default)

    @property
    def block_count(self) -> int | None:
        """Number of layers (``{arch}.block_count``), or None if absent."""
        n = self.metadata.get(f"{self.arch}.block_count")
        return int(n) if n is not None else None

    @staticmethod
    def layer_of(name: str) -> int | None:
        """Layer index of a ``blk.{i}.*`` tensor name, else None."""
        m = _LAYER_RE.match(name)
        return int(m.group(1)) if m else None

    def tensors_for_layers(self, layers: Iterable[int], *, non_layer: bool = False) -> list[str]:
        """Names of the ``blk.{i}.*`` tensors for i in ``layers``, in file order; with
        ``non_layer=True`` also every tensor outside the layers (token_embd, output_norm,
        output, ...)."""
        wanted = set(layers)
        out = []
        for name in self.tensors:
            layer = self.layer_of(name)
            if (layer is None and non_layer) or (layer is not None and layer in wanted):
                out.append(name)
        return out

    def _info(self, name: str) -> TensorInfo:
        info = self.tensors.get(name)
        if info is None:
            raise GGUFError(f"no tensor named {name!r} in this GGUF ({len(self.tensors)} tensors)")
        return info

    def byte_ranges(self, names: Iterable[str], max_gap: int | None = None) -> list[tuple[int, int]]:
        """Half-open absolute byte ranges [start, end) that cover the named tensors, sorted
        and merged: two tensors share a range when at most ``max_gap`` bytes lie between
        them (default ``alignment - 1``, i.e. only padding). One HTTP Range request each;
        see ``http_range``."""
        gap = self.alignment - 1 if max_gap is None else max_gap
        spans = sorted({(i.offset, i.end) for i in map(self._info, names)})
        merged: list[tuple[int, int]] = []
        for start, end in spans:
            if merged and start - merged[-1][1] <= gap:
                merged[-1] = (merged[-1][0], max(merged[-1][1], end))
            else:
                merged.append((start, end))
        return merged

    def tensor_bytes(self, name: str, blob: bytes | bytearray | memoryview,
                     blob_start: int = 0) -> memoryview:
        """The named tensor's bytes, cut (no copy) from ``blob``, which holds the file's bytes
        from absolute offset ``blob_start`` on (e.g. one range from ``byte_ranges``)."""
        info = self._info(name)
        lo, hi = info.offset - blob_start, info.end - blob_start
        view = memoryview(blob).cast("B")
        if lo < 0 or hi > len(view):
            raise GGUFError(f"tensor {name!r} is at bytes [{info.offset}, {info.end}) of the file, "
                            f"outside the {len(view)} bytes given from offset {blob_start}")
        return view[lo:hi]

    def tensor_array(self, name: str, raw: bytes | bytearray | memoryview | np.ndarray) -> np.ndarray:
        """Dequantized float32 array of the named tensor from exactly its ``nbytes`` raw
        bytes, in numpy shape (reversed ne, e.g. [ne1, ne0]). UnsupportedQuantError if its
        type has no dequantizer."""
        info = self._info(name)
        fmt = format_for(info.ggml_type, name)
        size = raw.nbytes if isinstance(raw, (np.ndarray, memoryview)) else len(raw)
        if size != info.nbytes:
            raise GGUFError(f"tensor {name!r} ({info.type_name} {list(info.shape)}) has "
                            f"{info.nbytes} bytes of data, got {size}")
        return fmt.dequantize(raw, info.n_elements, name).reshape(info.np_shape)


def http_range(start: int, end: int) -> str:
    """HTTP Range header value for the half-open byte range [start, end)."""
    return f"bytes={start}-{end - 1}"


class _Cursor:
    """Reads little-endian fields from a prefix of a file of known size. Each read
    first proves the bytes exist: past the file's end -> GGUFError (truncated), past the
    prefix -> NeedMoreData."""

    __slots__ = ("buf", "pos", "have", "file_size")

    def __init__(self, buf: bytes, file_size: int) -> None:
        self.buf = buf
        self.pos = 0
        self.have = len(buf)
        self.file_size = file_size

    def need(self, n: int, what: str) -> int:
        start = self.pos
        end = start + n
        if end > self.have:
            if end > self.file_size:
                raise GGUFError(f"GGUF truncated: {what} needs bytes [{start}, {end}) but the "
                                f"file ends at byte {self.file_size}; re-download the model")
            raise NeedMoreData(end)
        self.pos = end
        return start

    def left(self) -> int:
        return self.file_size - self.pos

    def u32(self, what: str) -> int:
        return _U32.unpack_from(self.buf, self.need(4, what))[0]

    def u64(self, what: str) -> int:
        return _U64.unpack_from(self.buf, self.need(8, what))[0]

    def raw_string(self, what: str, limit: int) -> bytes:
        n = self.u64(f"length of {what}")
        if n > limit:
            raise GGUFError(f"{what} is {n} bytes long, over the limit of {limit} bytes")
        start = self.need(n, what)
        return self.buf[start:start + n]


def _check_count(cur: _Cursor, count: int, limit: int, min_item: int, what: str) -> None:
    if count > limit:
        raise GGUFError(f"{what}: count {count} is over the limit of {limit}")
    if count * min_item > cur.left():
        raise GGUFError(f"{what}: {count} items need at least {count * min_item} bytes but only "
                        f"{cur.left()} bytes remain in the file (corrupt or truncated)")


def _read_value(cur: _Cursor, vtype: int, key: str) -> tuple[Any, ValueType | None]:
    """One metadata value; returns (value, item type for arrays)."""
    st = _SCALAR_STRUCT.get(vtype)
    if st is not None:
        value = st.unpack_from(cur.buf, cur.need(st.size, f"value of metadata key {key!r}"))[0]
        return (value != 0 if vtype == ValueType.BOOL else value), None
    if vtype == ValueType.STRING:
        raw = cur.raw_string(f"string value of metadata key {key!r}", MAX_STRING_BYTES)
        return raw.decode("utf-8", "surrogateescape"), None
    if vtype != ValueType.ARRAY:
        raise GGUFError(f"metadata key {key!r} has unknown value type {vtype}")

    itype = cur.u32(f"item type of array {key!r}")
    count = cur.u64(f"item count of array {key!r}")
    what = f"array {key!r}"
    if itype == ValueType.STRING:
        _check_count(cur, count, MAX_ARRAY_ITEMS, 8, what)
        items = [""] * count
        buf, unpack, have = cur.buf, _U64.unpack_from, cur.have
        for i in range(count):  # the hot loop of header parsing: vocabularies, merges
            pos = cur.pos
            if pos + 8 > have:
                cur.need(8, f"item {i} of {what}")
            n = unpack(buf, pos)[0]
            if n > MAX_STRING_BYTES:
                raise GGUFError(f"item {i} of {what} is {n} bytes long, over the limit of "
                                f"{MAX_STRING_BYTES} bytes")
            end = pos + 8 + n
            if end > have:
                cur.pos = pos + 8
                cur.need(n, f"item {i} of {what}")
            items[i] = buf[pos + 8:end].decode("utf-8", "surrogateescape")
            cur.pos = end
        return items, ValueType.STRING
    dtype = _ARRAY_DTYPE.get(itype)
    if dtype is None:
        if itype == ValueType.ARRAY:
            raise GGUFError(f"{what} is an array of arrays, which GGUF readers (llama.cpp "
                            f"included) do not support")
        raise GGUFError(f"{what} has unknown item type {itype}")
    itemsize = np.dtype(dtype).itemsize
    _check_count(cur, count, MAX_ARRAY_ITEMS, itemsize, what)
    start = cur.need(count * itemsize, f"items of {what}")
    arr = np.frombuffer(cur.buf, dtype=dtype, count=count, offset=start)
    arr = arr != 0 if itype == ValueType.BOOL else arr.astype(arr.dtype.newbyteorder("="))
    return arr, ValueType(itype)


def _decode_name(raw: bytes, what: str) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise GGUFError(f"{what} {raw[:64]!r} is not valid UTF-8 ({e.reason} at byte {e.start})") from None


def _parse_preamble(cur: _Cursor) -> int:
    start = cur.need(4, "magic")
    magic = cur.buf[start:start + 4]
    if magic != GGUF_MAGIC:
        raise GGUFError(f"not a GGUF file: magic is {magic!r}, expected {GGUF_MAGIC!r}")
    version = cur.u32("version")
    if version in SUPPORTED_VERSIONS:
        return version
    if version == 1:
        raise GGUFError("GGUF v1 (2023, 32-bit counts) is not supported; convert the model again "
                        "with a current llama.cpp (it writes v3)")
    swapped = int.from_bytes(version.to_bytes(4, "little"), "big")
    if swapped in SUPPORTED_VERSIONS:
        raise GGUFError(f"big-endian GGUF v{swapped} is not supported; use a little-endian file")
    raise GGUFError(f"unsupported GGUF version {version} (tabmesh reads versions 2 and 3)")


def parse_header(data: bytes | bytearray | memoryview, file_size: int) -> GGUFFile:
    """Parse and validate the header from ``data``, the first ``len(data)`` bytes of a file
    of ``file_size`` bytes.

    Raises NeedMoreData(n) if the prefix is too short (fetch a longer one and call again;
    see NeedMoreData), GGUFError if the file is invalid, truncated or hostile.
    """
    buf = bytes(data)  # one copy of the prefix: bytes slicing + decode is the fastest path
    if len(buf) > file_size:
        raise GGUFError(f"given {len(buf)} bytes of a file said to be {file_size} bytes long")
    cur = _Cursor(buf, file_size)
    version = _parse_preamble(cur)
    n_tensors = cur.u64("tensor count")
    n_kv = cur.u64("metadata count")
    _check_count(cur, n_tensors, MAX_TENSORS, _MIN_TENSOR_INFO_BYTES, "tensor count")
    _check_count(cur, n_kv, MAX_KV, _MIN_KV_BYTES, "metadata count")

    metadata: dict[str, Any] = {}
    value_types: dict[str, tuple[ValueType, ValueType | None]] = {}
    for i in range(n_kv):
        key = _decode_name(cur.raw_string(f"key of metadata entry {i}", MAX_KEY_BYTES),
                           f"key of metadata entry {i}")
        if not key:
            raise GGUFError(f"metadata entry {i} has an empty key")
        if key in metadata:
            raise GGUFError(f"duplicate metadata key {key!r} (entry {i})")
        vtype = cur.u32(f"value type of metadata key {key!r}")
        value, itype = _read_value(cur, vtype, key)
        metadata[key] = value
        value_types[key] = (ValueType(vtype), itype)

    alignment = DEFAULT_ALIGNMENT
    if ALIGNMENT_KEY in metadata:
        alignment = metadata[ALIGNMENT_KEY]
        if value_types[ALIGNMENT_KEY][0] != ValueType.UINT32:
            raise GGUFError(f"metadata key {ALIGNMENT_KEY!r} must be UINT32, "
                            f"not {value_types[ALIGNMENT_KEY][0].name}")
        if alignment == 0 or alignment & (alignment - 1):
            raise GGUFError(f"metadata key {ALIGNMENT_KEY!r} is {alignment}, not a power of two")

    pending = []  # (name, shape, type, relative offset, nbytes)
    seen: set[str] = set()
    for i in range(n_tensors):
        name = _decode_name(cur.raw_string(f"name of tensor {i}", MAX_TENSOR_NAME_BYTES),
                            f"name of tensor {i}")
        if not name:
            raise GGUFError(f"tensor {i} has an empty name")
        if name in seen:
            raise GGUFError(f"duplicate tensor name {name!r} (tensor {i})")
        seen.add(name)
        n_dims = cur.u32(f"dimension count of tensor {name!r}")
        if not 1 <= n_dims <= MAX_DIMS:
            raise GGUFError(f"tensor {name!r} has {n_dims} dimensions; must be 1 to {MAX_DIMS}")
        shape = tuple(cur.u64(f"dimension {d} of tensor {name!r}") for d in range(n_dims))
        n_elements = 1
        for d, ne in enumerate(shape):
            if ne == 0 or ne > INT64_MAX:
                raise GGUFError(f"tensor {name!r} has dimension {d} of {ne}; must be 1 to {INT64_MAX}")
            n_elements *= ne
            if n_elements > INT64_MAX:
                raise GGUFError(f"tensor {name!r} shape {list(shape)} has more than 2^63-1 elements")
        ggml_type = cur.u32(f"type of tensor {name!r}")
        if ggml_type not in TYPE_SIZES:
            raise GGUFError(f"tensor {name!r} has unknown ggml type id {ggml_type}; the file "
                            f"is corrupt or newer than this tabmesh")
        block_size = TYPE_SIZES[ggml_type][0]
        if shape[0] % block_size:
            raise GGUFError(f"tensor {name!r} ({type_name(ggml_type)}, shape {list(shape)}): "
                            f"row length {shape[0]} is not a multiple of the block size {block_size}")
        nbytes = tensor_nbytes(ggml_type, n_elements, name)
        offset = cur.u64(f"data offset of tensor {name!r}")
        if offset % alignment:
            raise GGUFError(f"tensor {name!r} data offset {offset} is not a multiple of the "
                            f"alignment {alignment}")
        pending.append((name, shape, ggml_type, offset, nbytes))

    header_size = cur.pos
    data_offset = -(-header_size // alignment) * alignment
    tensors: dict[str, TensorInfo] = {}
    for name, shape, ggml_type, rel, nbytes in pending:
        start = data_offset + rel
        if start + nbytes > file_size:
            raise GGUFError(
                f"tensor {name!r} ({type_name(ggml_type)} {list(shape)}, {nbytes} bytes at file "
                f"offset {start}) ends at byte {start + nbytes}, past the end of the file "
                f"({file_size} bytes): the file is truncated or corrupt; re-download the model")
        tensors[name] = TensorInfo(name, shape, ggml_type, start, nbytes)
    by_offset = sorted(tensors.values(), key=lambda t: t.offset)
    for a, b in zip(by_offset, by_offset[1:], strict=False):
        if b.offset < a.end:
            raise GGUFError(f"tensors {a.name!r} [{a.offset}, {a.end}) and {b.name!r} "
                            f"[{b.offset}, {b.end}) overlap")

    return GGUFFile(version=version, alignment=alignment, metadata=metadata,
                    value_types=value_types, tensors=tensors, data_offset=data_offset,
                    file_size=file_size, header_size=header_size)


def read_gguf_path(path: str | os.PathLike, first_read: int = 1 << 20) -> GGUFFile:
    """Parse the header of a local GGUF file, reading only as much of it as needed
    (prefix doubled on NeedMoreData, the same loop an HTTP Range fetcher runs)."""
    with open(path, "rb") as f:
        file_size = os.fstat(f.fileno()).st_size
        buf = bytearray(f.read(min(first_read, file_size)))
        while True:
            try:
                return parse_header(buf, file_size)
            except NeedMoreData as e:
                want = min(file_size, max(e.n_bytes_needed, 2 * len(buf)))
                more = f.read(want - len(buf))
                if not more:  # the file shrank under us
                    raise GGUFError(f"{path}: file ended at byte {len(buf)} "
                                    f"while reading its header") from None
                buf += more


def read_tensor_bytes(path: str | os.PathLike, info: TensorInfo) -> bytes:
    """Raw bytes of one tensor from a local file."""
    with open(path, "rb") as f:
        f.seek(info.offset)
        raw = f.read(info.nbytes)
    if len(raw) != info.nbytes:
        raise GGUFError(f"{path}: tensor {info.name!r} needs bytes [{info.offset}, {info.end}) "
                        f"but the file ends at byte {info.offset + len(raw)}")
    return raw
