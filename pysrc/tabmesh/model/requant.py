"""Re-quantize a GGUF to Q8_0, deterministically, with numpy alone.

Used to make a second quant type of the one model the project ships (SmolLM2 Q4_1), so
that the model, the kernels and llama.cpp can be compared on Q8_0 weights too. The output
depends only on the input file's bytes and this code: CI regenerates the identical file
and checks its sha256 (tests/fixtures/model_q8_0.json) instead of storing 145 MB.

    python -m tabmesh.model.requant IN.gguf OUT.gguf

What it writes: a GGUF v3 with the input's metadata (``general.file_type`` set to 7,
MOSTLY_Q8_0), its tensors in the same order and alignment, where
- every 2-D tensor is Q8_0: copied unchanged if it already is (SmolLM2's token_embd),
  otherwise dequantized to float32 (tabmesh.quants, bit-exact with ggml) and quantized by
  ``quantize_q8_0``, bit-exact with gguf-py's ``gguf.quants.quantize`` and ggml's
  ``quantize_row_q8_0_ref`` (round half away from zero);
- every 1-D tensor (norms, biases) is F32.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import struct
import sys
from typing import Any, BinaryIO

import numpy as np

from tabmesh.gguf import GGUFFile, ValueType, read_gguf_path, read_tensor_bytes
from tabmesh.quants import GGMLType

LLAMA_FTYPE_ALL_F32, LLAMA_FTYPE_MOSTLY_Q8_0 = 0, 7
_FTYPE = {GGMLType.F32: LLAMA_FTYPE_ALL_F32, GGMLType.Q8_0: LLAMA_FTYPE_MOSTLY_Q8_0}
QK8_0 = 32


def round_half_away(x: np.ndarray) -> np.ndarray:
    """C ``roundf``: to nearest, halves away from zero, exactly (no x + 0.5 rounding slip)."""
    a = np.abs(x)
    floored = np.floor(a)
    return np.sign(x) * (floored + np.floor(2 * (a - floored)))


def quantize_q8_0(x: np.ndarray) -> np.ndarray:
    """float32 values (a multiple of 32 of them, row-major) -> Q8_0 blocks (n_blocks, 34) uint8.

    Per block of 32: d = max|x| / 127 (float32), q = roundf(x * (1/d)) (0 if d == 0),
    stored as f16(d) then 32 int8 q: ggml's quantize_row_q8_0_ref."""
    blocks = np.asarray(x, np.float32).reshape(-1, QK8_0)
    d = np.abs(blocks).max(axis=1, keepdims=True) / np.float32(127)  # (n, 1) float32
    with np.errstate(divide="ignore"):
        inv_d = np.where(d == 0, np.float32(0), np.float32(1) / d)
    q = round_half_away(blocks * inv_d)
    out = np.empty((blocks.shape[0], 2 + QK8_0), np.uint8)
    out[:, :2] = d.astype("<f2").view(np.uint8)
    out[:, 2:] = q.astype(np.int8).view(np.uint8)
    return out


# -- a minimal GGUF v3 writer (layout: see the docstring of tabmesh.gguf) -------------------

_SCALAR_FMT = {
    ValueType.UINT8: "<B", ValueType.INT8: "<b", ValueType.UINT16: "<H", ValueType.INT16: "<h",
    ValueType.UINT32: "<I", ValueType.INT32: "<i", ValueType.FLOAT32: "<f", ValueType.BOOL: "<B",
    ValueType.UINT64: "<Q", ValueType.INT64: "<q", ValueType.FLOAT64: "<d",
}


def _string(s: str) -> bytes:
    b = s.encode("utf-8", "surrogateescape")
    return struct.pack("<Q", len(b)) + b


def _value(value: Any, vtype: ValueType, itype: ValueType | None) -> bytes:
    if vtype == ValueType.STRING:
        return _string(value)
    if vtype != ValueType.ARRAY:
        return struct.pack(_SCALAR_FMT[vtype], value)
    head = struct.pack("<IQ", itype, len(value))
    if itype == ValueType.STRING:
        return head + b"".join(_string(s) for s in value)
    fmt = _SCALAR_FMT[itype]
    return head + np.asarray(value).astype(fmt).tobytes()


def write_gguf(f: BinaryIO, metadata: dict[str, Any],
               value_types: dict[str, tuple[ValueType, ValueType | None]],
               tensors: list[tuple[str, tuple[int, ...], int, bytes]], alignment: int) -> None:
    """Write a GGUF v3. ``tensors``: (name, GGUF ne, ggml type, raw bytes), in file order."""
    out = [b"GGUF", struct.pack("<IQQ", 3, len(tensors), len(metadata))]
    for key, value in metadata.items():
        vtype, itype = value_types[key]
        out += [_string(key), struct.pack("<I", vtype), _value(value, vtype, itype)]
    offset = 0
    for name, shape, ggml_type, raw in tensors:
        out += [_string(name), struct.pack("<I", len(shape)), struct.pack(f"<{len(shape)}Q", *shape),
                struct.pack("<IQ", ggml_type, offset)]
        offset += -(-len(raw) // alignment) * alignment
    header = b"".join(out)
    f.write(header + bytes(-len(header) % alignment))
    for _, _, _, raw in tensors:
        f.write(raw)
        f.write(bytes(-len(raw) % alignment))


def requantize_q8_0(src: str | os.PathLike, dst: str | os.PathLike) -> str:
    """Write the Q8_0 version of GGUF ``src`` to ``dst`` (see the module docstring);
    returns the sha256 hex digest of what was written. Writes to ``dst``.tmp, then renames."""
    return requantize(src, dst, GGMLType.Q8_0)


def requantize(src: str | os.PathLike, dst: str | os.PathLike, target: int) -> str:
    """Like ``requantize_q8_0`` for ``target`` Q8_0 or F32 (F32: every tensor dequantized,
    exactly the float32 weights tabmesh's numpy model computes with)."""
    if target not in _FTYPE:
        raise ValueError(f"target must be Q8_0 or F32, got {target}")
    g: GGUFFile = read_gguf_path(src)
    metadata = dict(g.metadata)
    value_types = dict(g.value_types)
    metadata["general.file_type"] = _FTYPE[target]
    value_types.setdefault("general.file_type", (ValueType.UINT32, None))
    tensors = []
    for name, info in g.tensors.items():
        raw = read_tensor_bytes(src, info)
        if len(info.shape) == 1 or target == GGMLType.F32:
            if info.ggml_type != GGMLType.F32:
                raw = g.tensor_array(name, raw).astype("<f4").tobytes()
            tensors.append((name, info.shape, GGMLType.F32, raw))
        elif info.ggml_type == GGMLType.Q8_0:
            tensors.append((name, info.shape, GGMLType.Q8_0, raw))
        else:
            q = quantize_q8_0(g.tensor_array(name, raw))
            tensors.append((name, info.shape, GGMLType.Q8_0, q.tobytes()))
    tmp = f"{os.fspath(dst)}.tmp"
    with open(tmp, "wb") as f:
        write_gguf(f, metadata, value_types, tensors, g.alignment)
    os.replace(tmp, dst)
    return sha256_file(dst)


def sha256_file(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("src")
    ap.add_argument("dst")
    args = ap.parse_args(argv)
    print(requantize_q8_0(args.src, args.dst))
    return 0


if __name__ == "__main__":
    sys.exit(main())
