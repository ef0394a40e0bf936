"""A small safetensors reader (the format of HF model.safetensors), for a browser tab that
has no `safetensors` package. Pure Python + numpy; validates the file as if it were
hostile before it hands out any tensor.

File layout (little-endian):

    u64 N                 length of the header in bytes
    N bytes               UTF-8 JSON object, may be padded at the end with spaces:
                            {"__metadata__": {str: str, ...},          (optional)
                             "<tensor name>": {"dtype": "F32",
                                               "shape": [d0, d1, ...],
                                               "data_offsets": [begin, end]}, ...}
    data                  the byte buffer; tensor bytes are data[begin:end], row-major

Checks, each refused with SafetensorsError naming the tensor (the rules of the reference
implementation, the `safetensors` Rust crate):
 1. the file holds at least 8 bytes, and 8 + N bytes; N <= MAX_HEADER_BYTES
 2. the header is UTF-8 JSON, an object, starting with "{"
 3. __metadata__, if present, maps strings to strings
 4. each tensor: a known dtype, a shape of non-negative ints, data_offsets two ints
    with begin <= end
 5. end - begin == product(shape) * itemsize(dtype)
 6. every tensor lies inside the data buffer
 7. sorted by begin, tensors neither overlap nor leave holes, and they cover the buffer
    exactly (the crate's "metadata incomplete buffer")

Tensors come out as numpy arrays: F32, F16 and BF16 (widened to float32, since numpy has
no bfloat16) are what models use; F64 and the integer and bool types read as themselves
(model files carry an I64 ``position_ids``). The F8 types are parsed but not converted.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from typing import Mapping

import numpy as np

from ..errors import TabmeshError

__all__ = ["SafetensorsError", "TensorEntry", "SafetensorsFile", "read_safetensors_path",
           "header_size"]

MAX_HEADER_BYTES = 100 * 1024 * 1024  # the Rust crate's limit
MAX_DIMS = 16

# dtype -> (itemsize, numpy dtype as stored, or None if numpy cannot hold it as-is)
DTYPES: dict[str, tuple[int, str | None]] = {
    "BOOL": (1, "|b1"), "U8": (1, "|u1"), "I8": (1, "|i1"),
    "F8_E4M3": (1, None), "F8_E5M2": (1, None),
    "I16": (2, "<i2"), "U16": (2, "<u2"), "F16": (2, "<f2"), "BF16": (2, None),
    "I32": (4, "<i4"), "U32": (4, "<u4"), "F32": (4, "<f4"),
    "I64": (8, "<i8"), "U64": (8, "<u8"), "F64": (8, "<f8"),
}
FLOAT_DTYPES = ("F32", "F16", "BF16")


class SafetensorsError(TabmeshError):
    """A safetensors file is truncated, malformed or hostile. The message names the tensor
    or field; re-download the file, or check it is a .safetensors file at all."""

    code = "bad_safetensors"


@dataclass(frozen=True)
class TensorEntry:
    """One tensor of the header. begin/end: byte offsets into the data buffer, which
    starts at ``data_start`` in the file."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.begin


def header_size(prefix: bytes) -> int:
    """The byte length of the whole header (8 + N) from the file's first 8 bytes: fetch
    that many bytes to parse the header (HTTP Range)."""
    if len(prefix) < 8:
        raise SafetensorsError(f"file too short: {len(prefix)} bytes, a safetensors file starts "
                               "with an 8-byte header length")
    (n,) = struct.unpack_from("<Q", prefix, 0)
    if n > MAX_HEADER_BYTES:
        raise SafetensorsError(f"header length {n} exceeds the {MAX_HEADER_BYTES}-byte limit: "
                               "not a safetensors file, or a corrupt one")
    return 8 + n


def _no_duplicates(pairs: list[tuple[str, object]]) -> dict:
    d = dict(pairs)
    if len(d) != len(pairs):
        seen: set[str] = set()
        dup = next(k for k, _ in pairs if k in seen or seen.add(k))
        raise SafetensorsError(f"header names {dup!r} twice")
    return d


def _parse_entries(header: Mapping, data_len: int) -> tuple[dict[str, str], dict[str, TensorEntry]]:
    metadata: dict[str, str] = {}
    entries: dict[str, TensorEntry] = {}
    for name, info in header.items():
        if name == "__metadata__":
            if not isinstance(info, dict) or not all(
                    isinstance(k, str) and isinstance(v, str) for k, v in info.items()):
                raise SafetensorsError("__metadata__ must map strings to strings")
            metadata = dict(info)
            continue
        if not isinstance(info, dict):
            raise SafetensorsError(f"tensor {name!r}: entry must be an object")
        dtype, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
        if dtype not in DTYPES:
            raise SafetensorsError(f"tensor {name!r}: unknown dtype {dtype!r}")
        if (not isinstance(shape, list) or len(shape) > MAX_DIMS or not all(
                type(d) is int and d >= 0 for d in shape)):
            raise SafetensorsError(f"tensor {name!r}: shape must be a list of at most {MAX_DIMS} "
                                   f"non-negative integers, got {shape!r:.100}")
        if (not isinstance(offsets, list) or len(offsets) != 2 or not all(
                type(o) is int and o >= 0 for o in offsets)):
            raise SafetensorsError(f"tensor {name!r}: data_offsets must be [begin, end], "
                                   f"got {offsets!r:.100}")
        begin, end = offsets
        if begin > end:
            raise SafetensorsError(f"tensor {name!r}: data_offsets begin {begin} > end {end}")
        n_elem = 1
        for d in shape:
            n_elem *= d
        expected = n_elem * DTYPES[dtype][0]
        if end - begin != expected:
            raise SafetensorsError(
                f"tensor {name!r}: {end - begin} bytes at data_offsets [{begin}, {end}], but "
                f"shape {shape} of {dtype} needs {expected}")
        if end > data_len:
            raise SafetensorsError(
                f"tensor {name!r}: data_offsets [{begin}, {end}] run past the end of the data "
                f"({data_len} bytes): the file is truncated or corrupt")
        entries[name] = TensorEntry(name, dtype, tuple(shape), begin, end)
    covered = 0
    previous = None
    for e in sorted(entries.values(), key=lambda e: (e.begin, e.end)):
        if e.begin < covered:
            raise SafetensorsError(f"tensor {e.name!r} at [{e.begin}, {e.end}] overlaps tensor "
                                   f"{previous.name!r} at [{previous.begin}, {previous.end}]")
        if e.begin > covered:
            raise SafetensorsError(f"a hole of {e.begin - covered} bytes before tensor {e.name!r}: "
                                   "tensors must cover the data buffer exactly")
        covered, previous = e.end, e
    if covered != data_len:
        raise SafetensorsError(f"tensors cover {covered} bytes but the data buffer holds "
                               f"{data_len}: "
                               "the file has trailing bytes or is corrupt")
    return metadata, entries


class SafetensorsFile:
    """A parsed safetensors file over its bytes (bytes, bytearray, memoryview, or a numpy
    uint8 array such as an np.memmap). Tensors are read on demand:

        st = SafetensorsFile(open("model.safetensors", "rb").read())
        w = st.tensor("embeddings.word_embeddings.weight")   # (30522, 384) float32
    """

    def __init__(self, buf) -> None:
        self._buf = np.frombuffer(buf, dtype=np.uint8) if not isinstance(buf, np.ndarray) else buf
        if self._buf.dtype != np.uint8 or self._buf.ndim != 1:
            raise TypeError("buffer must be bytes-like or a 1-D uint8 array")
        size = len(self._buf)
        hsize = header_size(bytes(self._buf[:8]))
        if size < hsize:
            raise SafetensorsError(f"file truncated: the header needs {hsize} bytes, the file "
                                   f"holds {size}")
        raw = bytes(self._buf[8:hsize])
        if not raw.startswith(b"{"):
            raise SafetensorsError("header must be a JSON object starting with '{'")
        try:
            header = json.loads(raw.decode("utf-8"), object_pairs_hook=_no_duplicates)
        except SafetensorsError:
            raise
        except (UnicodeDecodeError, ValueError) as e:
            raise SafetensorsError(f"header is not UTF-8 JSON: {e}") from None
        if not isinstance(header, dict):
            raise SafetensorsError("header must be a JSON object")
        self.data_start = hsize
        self.metadata, self.entries = _parse_entries(header, size - hsize)

    def __contains__(self, name: str) -> bool:
        return name in self.entries

    def keys(self) -> list[str]:
        return list(self.entries)

    def raw(self, name: str) -> np.ndarray:
        """The tensor's bytes, a uint8 view into the buffer (no copy)."""
        e = self._entry(name)
        return self._buf[self.data_start + e.begin:self.data_start + e.end]

    def tensor(self, name: str) -> np.ndarray:
        """The tensor as a numpy array of its shape: BF16 widened to float32, the others in
        their own dtype (a read-only view where the buffer is read-only and aligned)."""
        e = self._entry(name)
        raw = self.raw(name)
        if e.dtype == "BF16":
            bits = raw.view("<u2").astype(np.uint32) << 16 if raw.size else np.zeros(0, np.uint32)
            return bits.view(np.float32).reshape(e.shape)
        np_dtype = DTYPES[e.dtype][1]
        if np_dtype is None:
            raise SafetensorsError(f"tensor {name!r}: dtype {e.dtype} has no numpy equivalent; "
                                   "convert the file to F16 or F32")
        itemsize = DTYPES[e.dtype][0]
        if (self._buf.ctypes.data + self.data_start + e.begin) % itemsize:
            raw = raw.copy()  # unaligned: numpy would still view it, but slowly
        return raw.view(np_dtype).reshape(e.shape)

    def float32(self, name: str) -> np.ndarray:
        """A float tensor (F32, F16 or BF16) as a contiguous float32 array."""
        e = self._entry(name)
        if e.dtype not in FLOAT_DTYPES:
            raise SafetensorsError(f"tensor {name!r} is {e.dtype}, expected one of {FLOAT_DTYPES}")
        return np.ascontiguousarray(self.tensor(name), dtype=np.float32)

    def _entry(self, name: str) -> TensorEntry:
        e = self.entries.get(name)
        if e is None:
            raise SafetensorsError(f"no tensor named {name!r} in the file")
        return e


def read_safetensors_path(path: str) -> SafetensorsFile:
    """Open a file on disk (memory-mapped read-only: nothing is copied until used)."""
    import os
    if os.path.getsize(path) == 0:
        raise SafetensorsError(f"{path} is empty")
    return SafetensorsFile(np.memmap(path, dtype=np.uint8, mode="r"))
