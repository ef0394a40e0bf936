"""Write tests/fixtures/ggml_numerics.json: ggml's own activation quantizers and dot
products, run on fixed inputs, the bit-exact references of tabmesh.model.ggml_numerics.

Run with the Python that has llama-cpp-python 0.3.x (its bundled ggml is called through
ctypes; the project venv does not need it):

    /work/refvenv/bin/python scripts/make_ggml_numerics_fixtures.py

Recorded, for rows X (float32, base64) made here from a fixed seed plus hand-made blocks:
- ``quantize_row_q8_0`` / ``quantize_row_q8_1`` of libggml-cpu (the CPU backend's, on this
  machine the AVX path) and ``quantize_row_q8_0_ref`` / ``quantize_row_q8_1_ref`` of
  libggml-base (ggml's scalar reference): the raw block bytes. One row holds blocks where
  the two differ (ties; 127/amax != 1/(amax/127)).
- ``ggml_vec_dot_q4_1_q8_1`` and ``ggml_vec_dot_q8_0_q8_0`` of random weight rows (raw
  Q4_1 / Q8_0 blocks, recorded) with the Q8_1 / Q8_0 rows above: float32 results.
- ``ggml_vec_dot_f16`` (n = 64 and 256), ``ggml_vec_soft_max_f32`` (its output and the
  double sum it returns, on scores with -inf entries) and ``ggml_vec_swiglu_f32`` on fixed
  random inputs.
"""

from __future__ import annotations

import base64
import ctypes
import json
import os
import platform
import sys

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join(ROOT, "tests", "fixtures", "ggml_numerics.json")
K = 256  # elements per row: 8 blocks


def b64(a: np.ndarray) -> str:
    return base64.b64encode(np.ascontiguousarray(a).tobytes()).decode()


def rows() -> np.ndarray:
    """(n, K) float32: random rows at several scales, then hand-made blocks."""
    rng = np.random.default_rng(20261201)
    out = [rng.standard_normal((16, K)).astype(np.float32) * s for s in (0.01, 1.0, 7.0)]
    heavy = rng.standard_normal((16, K)).astype(np.float32)
    heavy[:, ::29] *= 40  # outliers, like real activations
    out.append(heavy)
    special = np.zeros((9, K), np.float32)
    special[0, 32:64] = np.arange(32) - 15.5  # amax 15.5
    special[1, :32] = np.concatenate([[127.0], np.arange(31) * 0.5 - 7.5])  # id = 1: exact ties
    special[1, 32:64] = -special[1, :32]
    special[2, :32] = 1e-30 * (np.arange(32) - 16)  # d underflows to 0 in f16
    special[3, :32] = 65504.0 * 127 / 126  # d near f16 max
    special[4] = rng.standard_normal(K).astype(np.float32) * 1e-6
    special[5, ::2] = 3.0
    special[5, 1::2] = -3.0
    special[6] = np.linspace(-1, 1, K, dtype=np.float32)
    special[7, :] = 0.0  # all-zero row: d = 0, id = 0
    special[8] = variant_splitters(rng)
    out.append(special)
    return np.concatenate(out).astype(np.float32)


def variant_splitters(rng: np.random.Generator) -> np.ndarray:
    """K floats, 8 blocks, each holding an x whose quant differs between the AVX path
    (x * (127/amax), ties to even) and the scalar reference (x * (1/(amax/127)), roundf)
    because the two multipliers differ by an ulp."""
    out = np.zeros(K, np.float32)
    found = 0
    while found < K // 32:
        amax = np.float32(rng.uniform(0.5, 8.0))
        d = amax / np.float32(127)
        id_x86, id_ref = np.float32(127) / amax, np.float32(1) / d
        if id_x86 == id_ref:
            continue
        k = int(rng.integers(3, 120))
        x = np.float32((k + 0.5) / float(id_x86))
        for _ in range(8):
            ref = np.float32(x * id_ref)
            if np.rint(x * id_x86) != np.sign(ref) * np.floor(np.abs(ref) + np.float32(0.5)):
                blk = rng.uniform(-1, 1, 32).astype(np.float32) * amax
                blk[0], blk[1] = amax, x
                out[32 * found:32 * found + 32] = blk
                found += 1
                break
            x = np.nextafter(x, np.float32(np.inf))
    return out


def weights(n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Raw Q4_1 (n, K/32, 20) and Q8_0 (n, K/32, 34) weight blocks with random fields."""
    nb = K // 32
    d = (rng.uniform(0.001, 0.05, (n, nb))).astype("<f2")
    m = (-rng.uniform(0.0, 0.4, (n, nb))).astype("<f2")
    qs4 = rng.integers(0, 256, (n, nb, 16), dtype=np.uint8)
    q41 = np.concatenate([d[..., None].view(np.uint8), m[..., None].view(np.uint8), qs4], axis=-1)
    d8 = (rng.uniform(0.0005, 0.01, (n, nb))).astype("<f2")
    qs8 = rng.integers(-127, 128, (n, nb, 32)).astype(np.int8).view(np.uint8)
    q80 = np.concatenate([d8[..., None].view(np.uint8), qs8], axis=-1)
    return q41, q80


def main() -> int:
    import llama_cpp

    libdir = os.path.join(os.path.dirname(llama_cpp.__file__), "lib")
    base = ctypes.CDLL(os.path.join(libdir, "libggml-base.so"), mode=ctypes.RTLD_GLOBAL)
    cpu = ctypes.CDLL(os.path.join(libdir, "libggml-cpu.so"), mode=ctypes.RTLD_GLOBAL)
    cpu.ggml_cpu_init()
    fp, i64 = ctypes.c_void_p, ctypes.c_int64
    for lib, name in ((cpu, "quantize_row_q8_0"), (cpu, "quantize_row_q8_1"),
                      (base, "quantize_row_q8_0_ref"), (base, "quantize_row_q8_1_ref")):
        getattr(lib, name).argtypes = [fp, fp, i64]
    for name in ("ggml_vec_dot_q4_1_q8_1", "ggml_vec_dot_q8_0_q8_0", "ggml_vec_dot_f16"):
        getattr(cpu, name).argtypes = [ctypes.c_int, fp, ctypes.c_size_t, fp, ctypes.c_size_t,
                                       fp, ctypes.c_size_t, ctypes.c_int]
    features = {f: bool(getattr(cpu, f"ggml_cpu_has_{f}")()) for f in
                ("avx", "avx2", "f16c", "fma", "avx512", "avx512_vnni", "avx_vnni")}

    x = rows()
    n = x.shape[0]

    def quant(lib, name: str, block: int) -> np.ndarray:
        out = np.zeros((n, K // 32, block), np.uint8)
        fn = getattr(lib, name)
        for i in range(n):
            fn(x[i].ctypes.data, out[i].ctypes.data, K)
        return out

    q8_0 = quant(cpu, "quantize_row_q8_0", 34)
    q8_1 = quant(cpu, "quantize_row_q8_1", 36)
    q8_0_ref = quant(base, "quantize_row_q8_0_ref", 34)
    q8_1_ref = quant(base, "quantize_row_q8_1_ref", 36)

    n_w = 24
    w41, w80 = weights(n_w, np.random.default_rng(7))
    dot41 = np.zeros((n_w, n), np.float32)
    dot80 = np.zeros((n_w, n), np.float32)
    res = np.zeros(1, np.float32)
    for r in range(n_w):
        for i in range(n):
            cpu.ggml_vec_dot_q4_1_q8_1(K, res.ctypes.data, 0, w41[r].ctypes.data, 0,
                                       q8_1[i].ctypes.data, 0, 1)
            dot41[r, i] = res[0]
            cpu.ggml_vec_dot_q8_0_q8_0(K, res.ctypes.data, 0, w80[r].ctypes.data, 0,
                                       q8_0[i].ctypes.data, 0, 1)
            dot80[r, i] = res[0]

    # f16 dot products (decode path of kq / kqv), softmax, swiglu
    rng = np.random.default_rng(11)
    n_dot = 32
    dots = {}
    for n_el in (64, 256):
        a = (rng.standard_normal((n_dot, n_el)) * 3).astype(np.float16)
        b = rng.standard_normal((n_dot, n_el)).astype(np.float16)
        r = np.zeros(n_dot, np.float32)
        for i in range(n_dot):
            cpu.ggml_vec_dot_f16(n_el, r[i:].ctypes.data, 0, a[i].ctypes.data, 0, b[i].ctypes.data, 0, 1)
        dots[n_el] = (a, b, r)
    cpu.ggml_vec_soft_max_f32.argtypes = [ctypes.c_int, fp, fp, ctypes.c_float]
    cpu.ggml_vec_soft_max_f32.restype = ctypes.c_double
    sm_x = (rng.standard_normal((16, 256)) * 6).astype(np.float32)
    sm_x[:, 200:] = -np.inf  # masked cells, as in a causal mask
    sm_x[3, :] = -np.inf
    sm_x[3, 0] = 1.0
    sm_y = np.zeros_like(sm_x)
    sm_sum = np.zeros(16, np.float64)
    for i in range(16):
        mx = np.float32(sm_x[i].max())
        sm_sum[i] = cpu.ggml_vec_soft_max_f32(256, sm_y[i].ctypes.data, sm_x[i].ctypes.data, mx)
    cpu.ggml_vec_swiglu_f32.argtypes = [ctypes.c_int, fp, fp, fp]
    sw_g = (rng.standard_normal(1536) * 4).astype(np.float32)
    sw_g[:8] = [0.0, -0.0, 100.0, -100.0, 88.0, -88.0, 1e-30, -1e-30]
    sw_u = rng.standard_normal(1536).astype(np.float32)
    sw_y = np.zeros(1536, np.float32)
    cpu.ggml_vec_swiglu_f32(1536, sw_y.ctypes.data, sw_g.ctypes.data, sw_u.ctypes.data)

    doc = {
        "generator": "scripts/make_ggml_numerics_fixtures.py",
        "llama_cpp_python": llama_cpp.__version__,
        "machine": platform.machine(), "cpu_features": features,
        "k": K, "n_rows": n,
        "x_f32": b64(x),
        "quantize_row_q8_0": b64(q8_0), "quantize_row_q8_1": b64(q8_1),
        "quantize_row_q8_0_ref": b64(q8_0_ref), "quantize_row_q8_1_ref": b64(q8_1_ref),
        "n_weight_rows": n_w, "w_q4_1": b64(w41), "w_q8_0": b64(w80),
        "vec_dot_q4_1_q8_1": b64(dot41), "vec_dot_q8_0_q8_0": b64(dot80),
        "vec_dot_f16": {str(n_el): {"x_f16": b64(a), "y_f16": b64(b), "dot_f32": b64(r)}
                        for n_el, (a, b, r) in dots.items()},
        "soft_max": {"x_f32": b64(sm_x), "y_f32": b64(sm_y), "sum_f64": b64(sm_sum)},
        "swiglu": {"g_f32": b64(sw_g), "u_f32": b64(sw_u), "y_f32": b64(sw_y)},
    }
    with open(OUT, "w") as f:
        json.dump(doc, f, indent=1)
        f.write("\n")
    print(f"wrote {OUT} ({os.path.getsize(OUT)} bytes); cpu features {features}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
