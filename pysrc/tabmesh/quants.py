"""ggml tensor block formats: sizes for every ggml type, numpy dequantization for the
ones tabmesh runs.

This is the reference the WGSL matvec kernels are checked against, and the document they
are written from: each format class below states its byte layout. Results are bit-exact
with llama.cpp's gguf-py (``gguf.quants.dequantize``), which is bit-exact with ggml's C
code: the float32 operations happen in the same order (``d * q + m``, ``(d * sc) * q - dmin * m``).
No dependency beyond numpy; this module runs in Pyodide.

Conventions for every layout:
- A tensor's data is its blocks back to back, no padding between blocks; block ``b`` of a
  tensor starts at byte ``b * type_size``. Rows (ne[0] elements) are a whole number of blocks.
- All multi-byte fields are little-endian. ``f16`` is IEEE binary16, converted to f32 exactly.
  ``f16`` fields are NOT 4-byte aligned in general: the block strides are 18 (Q4_0),
  34 (Q8_0) and 210 (Q6_K) bytes, so a kernel that binds the tensor as ``array<u32>`` must
  load the word holding a field and shift/mask (use ``unpack2x16float`` on the aligned word,
  then pick the half). Only Q4_1 (20) and Q4_K (144) blocks keep 4-byte alignment.
- Tensor data starts at an ``alignment`` boundary in the file (32 bytes by default).
- Element ``i`` of a block is element ``b * block_size + i`` of the flattened tensor,
  ne[0] fastest (row-major ``[ne1, ne0]`` in numpy terms).

Supported: F32, F16, BF16, Q4_0, Q4_1, Q8_0, Q4_K, Q6_K. ``TYPE_SIZES`` knows the sizes of all
ggml types, so a file holding others still parses; dequantizing one of them raises
``UnsupportedQuantError`` naming the type and the tensor.
"""

from __future__ import annotations

from enum import IntEnum
from typing import ClassVar

import numpy as np

from .errors import GGUFError, UnsupportedQuantError

QK_K = 256  # elements in a K-quant super-block


class GGMLType(IntEnum):
    """ggml type ids as stored in a GGUF tensor info (ggml.h ``enum ggml_type``)."""

    F32 = 0
    F16 = 1
    Q4_0 = 2
    Q4_1 = 3
    Q5_0 = 6
    Q5_1 = 7
    Q8_0 = 8
    Q8_1 = 9
    Q2_K = 10
    Q3_K = 11
    Q4_K = 12
    Q5_K = 13
    Q6_K = 14
    Q8_K = 15
    IQ2_XXS = 16
    IQ2_XS = 17
    IQ3_XXS = 18
    IQ1_S = 19
    IQ4_NL = 20
    IQ3_S = 21
    IQ2_S = 22
    IQ4_XS = 23
    I8 = 24
    I16 = 25
    I32 = 26
    I64 = 27
    F64 = 28
    IQ1_M = 29
    BF16 = 30
    TQ1_0 = 34
    TQ2_0 = 35
    MXFP4 = 39
    NVFP4 = 40
    Q1_0 = 41


# (elements per block, bytes per block) for every ggml type; mirrors ggml's type_traits.
TYPE_SIZES: dict[int, tuple[int, int]] = {
    GGMLType.F32: (1, 4),
    GGMLType.F16: (1, 2),
    GGMLType.Q4_0: (32, 2 + 16),
    GGMLType.Q4_1: (32, 2 + 2 + 16),
    GGMLType.Q5_0: (32, 2 + 4 + 16),
    GGMLType.Q5_1: (32, 2 + 2 + 4 + 16),
    GGMLType.Q8_0: (32, 2 + 32),
    GGMLType.Q8_1: (32, 4 + 4 + 32),
    GGMLType.Q2_K: (256, 2 + 2 + QK_K // 16 + QK_K // 4),
    GGMLType.Q3_K: (256, 2 + QK_K // 4 + QK_K // 8 + 12),
    GGMLType.Q4_K: (256, 2 + 2 + QK_K // 2 + 12),
    GGMLType.Q5_K: (256, 2 + 2 + QK_K // 2 + QK_K // 8 + 12),
    GGMLType.Q6_K: (256, 2 + QK_K // 2 + QK_K // 4 + QK_K // 16),
    GGMLType.Q8_K: (256, 4 + QK_K + QK_K // 8),
    GGMLType.IQ2_XXS: (256, 2 + QK_K // 4),
    GGMLType.IQ2_XS: (256, 2 + QK_K // 4 + QK_K // 32),
    GGMLType.IQ3_XXS: (256, 2 + QK_K // 4 + QK_K // 8),
    GGMLType.IQ1_S: (256, 2 + QK_K // 8 + QK_K // 16),
    GGMLType.IQ4_NL: (32, 2 + 16),
    GGMLType.IQ3_S: (256, 2 + QK_K // 4 + QK_K // 8 + QK_K // 32 + 4),
    GGMLType.IQ2_S: (256, 2 + QK_K // 4 + QK_K // 16),
    GGMLType.IQ4_XS: (256, 2 + 2 + QK_K // 2 + QK_K // 64),
    GGMLType.I8: (1, 1),
    GGMLType.I16: (1, 2),
    GGMLType.I32: (1, 4),
    GGMLType.I64: (1, 8),
    GGMLType.F64: (1, 8),
    GGMLType.IQ1_M: (256, QK_K // 8 + QK_K // 16 + QK_K // 32),
    GGMLType.BF16: (1, 2),
    GGMLType.TQ1_0: (256, 2 + 4 * 13),
    GGMLType.TQ2_0: (256, 2 + 64),
    GGMLType.MXFP4: (32, 1 + 16),
    GGMLType.NVFP4: (64, 4 + 32),
    GGMLType.Q1_0: (128, 2 + 16),
}


def type_name(ggml_type: int) -> str:
    """``"Q4_K"`` for 12; ``"type 99"`` for an id ggml does not define."""
    try:
        return GGMLType(ggml_type).name
    except ValueError:
        return f"type {ggml_type}"


def _where(tensor: str | None) -> str:
    return f"tensor {tensor!r}: " if tensor else ""


def tensor_nbytes(ggml_type: int, n_elements: int, tensor: str | None = None) -> int:
    """Bytes taken by ``n_elements`` of ``ggml_type``; GGUFError if the type is unknown or
    the count is not a whole number of blocks."""
    sizes = TYPE_SIZES.get(ggml_type)
    if sizes is None:
        raise GGUFError(f"{_where(tensor)}unknown ggml type id {ggml_type}; the file is "
                        f"corrupt or newer than this tabmesh")
    block_size, type_size = sizes
    if n_elements % block_size:
        raise GGUFError(f"{_where(tensor)}{n_elements} elements is not a whole number of "
                        f"{type_name(ggml_type)} blocks of {block_size}")
    return n_elements // block_size * type_size


def _f16(col: np.ndarray) -> np.ndarray:
    """(n_blocks, 2) uint8 -> (n_blocks, 1) float32, exact."""
    return col.view("<f2").astype(np.float32)


def _nibbles(qs: np.ndarray) -> np.ndarray:
    """(n, k) packed bytes -> (n, 2k): all low nibbles, then all high nibbles."""
    return np.concatenate([qs & np.uint8(0x0F), qs >> np.uint8(4)], axis=-1)


class BlockFormat:
    """One ggml block format. Subclasses set the four class attributes and
    ``dequantize_blocks``; nothing is instantiated."""

    ggml_type: ClassVar[int]
    name: ClassVar[str]
    block_size: ClassVar[int]  # elements per block
    type_size: ClassVar[int]  # bytes per block

    @classmethod
    def dequantize_blocks(cls, blocks: np.ndarray) -> np.ndarray:
        """(n_blocks, type_size) uint8 -> (n_blocks, block_size) float32."""
        raise NotImplementedError

    @classmethod
    def dequantize(cls, raw: bytes | bytearray | memoryview | np.ndarray, n_elements: int,
                   tensor: str | None = None) -> np.ndarray:
        """Raw tensor bytes -> flat float32 array of ``n_elements``.

        ``raw`` must hold exactly ``n_elements / block_size`` blocks."""
        if n_elements < 0 or n_elements % cls.block_size:
            raise GGUFError(f"{_where(tensor)}{n_elements} elements is not a whole number of "
                            f"{cls.name} blocks of {cls.block_size}")
        n_blocks = n_elements // cls.block_size
        if isinstance(raw, np.ndarray):
            data = np.ascontiguousarray(raw).reshape(-1).view(np.uint8)
        else:
            data = np.frombuffer(raw, dtype=np.uint8)
        if data.size != n_blocks * cls.type_size:
            raise GGUFError(f"{_where(tensor)}{cls.name} data of {n_elements} elements takes "
                            f"{n_blocks * cls.type_size} bytes, got {data.size}")
        out = cls.dequantize_blocks(data.reshape(n_blocks, cls.type_size))
        return np.ascontiguousarray(out, dtype=np.float32).reshape(n_elements)


class F32(BlockFormat):
    """F32: one little-endian IEEE float32 per element, 4 bytes."""

    ggml_type, name, block_size, type_size = GGMLType.F32, "F32", 1, 4

    @classmethod
    def dequantize_blocks(cls, blocks: np.ndarray) -> np.ndarray:
        return blocks.view("<f4").astype(np.float32)  # astype copies: never a view of raw


class F16(BlockFormat):
    """F16: one little-endian IEEE binary16 per element, 2 bytes."""

    ggml_type, name, block_size, type_size = GGMLType.F16, "F16", 1, 2

    @classmethod
    def dequantize_blocks(cls, blocks: np.ndarray) -> np.ndarray:
        return blocks.view("<f2").astype(np.float32)


class BF16(BlockFormat):
    """BF16: the high 16 bits of a float32, little-endian, 2 bytes. f32 bits = u16 << 16."""

    ggml_type, name, block_size, type_size = GGMLType.BF16, "BF16", 1, 2

    @classmethod
    def dequantize_blocks(cls, blocks: np.ndarray) -> np.ndarray:
        return (blocks.view("<u2").astype(np.uint32) << np.uint32(16)).view(np.float32)


class Q4_0(BlockFormat):
    """Q4_0: 32 elements in 18 bytes (block_q4_0).

    bytes 0..1    d   f16 scale
    bytes 2..17   qs  16 bytes of 4-bit quants
    element j      (j < 16) = d * ((qs[j] & 0xF) - 8)
    element j + 16 (j < 16) = d * ((qs[j] >> 4)  - 8)
    """

    ggml_type, name, block_size, type_size = GGMLType.Q4_0, "Q4_0", 32, 18

    @classmethod
    def dequantize_blocks(cls, blocks: np.ndarray) -> np.ndarray:
        d = _f16(blocks[:, 0:2])
        q = _nibbles(blocks[:, 2:18]).astype(np.int8) - np.int8(8)
        return d * q.astype(np.float32)


class Q4_1(BlockFormat):
    """Q4_1: 32 elements in 20 bytes (block_q4_1); 4-byte aligned blocks.

    bytes 0..1    d   f16 scale
    bytes 2..3    m   f16 minimum (offset)
    bytes 4..19   qs  16 bytes of 4-bit quants
    element j      (j < 16) = d * (qs[j] & 0xF) + m
    element j + 16 (j < 16) = d * (qs[j] >> 4)  + m
    As u32 words: word 0 = d | m << 16 (unpack2x16float gives (d, m)), words 1..4 = qs.
    """

    ggml_type, name, block_size, type_size = GGMLType.Q4_1, "Q4_1", 32, 20

    @classmethod
    def dequantize_blocks(cls, blocks: np.ndarray) -> np.ndarray:
        d = _f16(blocks[:, 0:2])
        m = _f16(blocks[:, 2:4])
        q = _nibbles(blocks[:, 4:20]).astype(np.float32)
        return d * q + m


class Q8_0(BlockFormat):
    """Q8_0: 32 elements in 34 bytes (block_q8_0).

    bytes 0..1    d   f16 scale
    bytes 2..33   qs  32 int8 quants
    element j = d * qs[j]
    """

    ggml_type, name, block_size, type_size = GGMLType.Q8_0, "Q8_0", 32, 34

    @classmethod
    def dequantize_blocks(cls, blocks: np.ndarray) -> np.ndarray:
        d = _f16(blocks[:, 0:2])
        return d * blocks[:, 2:34].view(np.int8).astype(np.float32)


def q4_k_scale_min(scales: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Unpack Q4_K's 12 scale bytes (n, 12) into 6-bit (sc, m), each (n, 8) uint8.

    for j < 4:  sc[j] = s[j] & 63                          m[j] = s[j + 4] & 63
    for j >= 4: sc[j] = (s[j + 4] & 0xF) | (s[j - 4] >> 6) << 4
                m[j]  = (s[j + 4] >> 4)  | (s[j]     >> 6) << 4
    (ggml's get_scale_min_k4)
    """
    s = scales
    sc = np.concatenate([s[:, 0:4] & 63, (s[:, 8:12] & 0x0F) | ((s[:, 0:4] >> 6) << 4)], axis=1)
    m = np.concatenate([s[:, 4:8] & 63, (s[:, 8:12] >> 4) | ((s[:, 4:8] >> 6) << 4)], axis=1)
    return sc, m


class Q4_K(BlockFormat):
    """Q4_K: 256 elements in 144 bytes (block_q4_K); 4-byte aligned blocks.

    bytes 0..1     d       f16 super-block scale
    bytes 2..3     dmin    f16 super-block scale of the mins
    bytes 4..15    scales  12 bytes: eight 6-bit scales sc[j] and eight 6-bit mins m[j]
                           packed as in ``q4_k_scale_min``
    bytes 16..143  qs      128 bytes of 4-bit quants
    Sub-block j (j = 0..7) holds elements 32j .. 32j+31. It reads the 32 bytes
    qs[32*(j//2) .. 32*(j//2)+31]: the low nibbles when j is even, the high nibbles when odd.
    element 32j + l = (d * sc[j]) * q - (dmin * m[j]),   q = that nibble of qs[32*(j//2) + l]
    (the two products are rounded to f32 first; that order makes it bit-exact)
    """

    ggml_type, name, block_size, type_size = GGMLType.Q4_K, "Q4_K", 256, 144

    @classmethod
    def dequantize_blocks(cls, blocks: np.ndarray) -> np.ndarray:
        n = blocks.shape[0]
        d = _f16(blocks[:, 0:2])
        dmin = _f16(blocks[:, 2:4])
        sc, m = q4_k_scale_min(blocks[:, 4:16])
        scale = (d * sc.astype(np.float32)).reshape(n, 8, 1)
        offset = (dmin * m.astype(np.float32)).reshape(n, 8, 1)
        qs = blocks[:, 16:144].reshape(n, 4, 1, 32)
        q = np.concatenate([qs & np.uint8(0x0F), qs >> np.uint8(4)], axis=2)  # (n, 4, 2, 32)
        q = q.reshape(n, 8, 32).astype(np.float32)
        return (scale * q - offset).reshape(n, QK_K)


class Q6_K(BlockFormat):
    """Q6_K: 256 elements in 210 bytes (block_q6_K).

    bytes 0..127    ql      low 4 bits of the quants
    bytes 128..191  qh      high 2 bits of the quants
    bytes 192..207  scales  16 int8 scales, scale s covers elements 16s .. 16s+15
    bytes 208..209  d       f16 super-block scale
    Two halves h = 0, 1 of 128 elements; half h uses ql[64h ..], qh[32h ..]. For l = 0..31:
      element 128h + l      : q = (ql[64h + l]      & 0xF) | ((qh[32h + l] >> 0) & 3) << 4
      element 128h + l + 32 : q = (ql[64h + l + 32] & 0xF) | ((qh[32h + l] >> 2) & 3) << 4
      element 128h + l + 64 : q = (ql[64h + l]      >> 4)  | ((qh[32h + l] >> 4) & 3) << 4
      element 128h + l + 96 : q = (ql[64h + l + 32] >> 4)  | ((qh[32h + l] >> 6) & 3) << 4
    element e = (d * scales[e // 16]) * (q - 32)   (product d * scale rounded to f32 first)
    """

    ggml_type, name, block_size, type_size = GGMLType.Q6_K, "Q6_K", 256, 210

    @classmethod
    def dequantize_blocks(cls, blocks: np.ndarray) -> np.ndarray:
        n = blocks.shape[0]
        ql = blocks[:, 0:128].reshape(n, 2, 1, 64)
        qh = blocks[:, 128:192].reshape(n, 2, 1, 32)
        scales = blocks[:, 192:208].view(np.int8).astype(np.float32)
        d = _f16(blocks[:, 208:210])
        low = np.concatenate([ql & np.uint8(0x0F), ql >> np.uint8(4)], axis=2)  # (n, 2, 2, 64)
        low = low.reshape(n, 2, 4, 32)
        shifts = np.array([0, 2, 4, 6], dtype=np.uint8).reshape(1, 1, 4, 1)
        high = (qh >> shifts) & np.uint8(3)  # (n, 2, 4, 32)
        q = (low | (high << np.uint8(4))).astype(np.int8) - np.int8(32)
        scale = (d * scales).reshape(n, 16, 1)
        return (scale * q.reshape(n, 16, 16).astype(np.float32)).reshape(n, QK_K)


FORMATS: dict[int, type[BlockFormat]] = {
    f.ggml_type: f for f in (F32, F16, BF16, Q4_0, Q4_1, Q8_0, Q4_K, Q6_K)
}
for _f in FORMATS.values():
    assert TYPE_SIZES[_f.ggml_type] == (_f.block_size, _f.type_size), _f.name


def format_for(ggml_type: int, tensor: str | None = None) -> type[BlockFormat]:
    """The block format class for ``ggml_type``; UnsupportedQuantError naming the type (and
    the tensor, when given) if tabmesh cannot run it."""
    fmt = FORMATS.get(ggml_type)
    if fmt is None:
        supported = ", ".join(f.name for f in FORMATS.values())
        raise UnsupportedQuantError(
            f"{_where(tensor)}ggml type {type_name(ggml_type)} ({ggml_type}) is not supported; "
            f"tabmesh runs {supported}. Re-quantize the model with llama.cpp's llama-quantize "
            f"to one of those (Q4_1, Q4_K_M or Q8_0, say)")
    return fmt


def dequantize(ggml_type: int, raw: bytes | bytearray | memoryview | np.ndarray,
               n_elements: int, tensor: str | None = None) -> np.ndarray:
    """Raw bytes of ``n_elements`` of ``ggml_type`` -> flat float32 array."""
    return format_for(ggml_type, tensor).dequantize(raw, n_elements, tensor)
