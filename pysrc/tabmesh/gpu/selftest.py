"""GPU self-test the page runs first: a tiled f32 matmul on seeded random input vs numpy."""

from __future__ import annotations

import numpy as np

from .device import Device


async def run_selftest(dev: Device, m: int = 64, n: int = 48, k: int = 80, seed: int = 1234) -> dict:
    """C = A·B on the GPU (wgsl/matmul_f32.wgsl), compared with numpy in float64.

    Tolerance: each output is a sum of k products of values in [-1, 1), accumulated in f32
    in tile order. Recursive summation in precision u = 2**-24 (Higham, with the rounding of
    each product) errs by at most (k + 1) * u * sum_j |a_ij b_jl|; we allow twice that,
    (k + 1) * eps32 * max_il sum_j |a_ij b_jl| (about 2e-4 for k = 80). A tiling or indexing
    bug drops or repeats whole products of size ~0.3, far above it.
    """
    rng = np.random.default_rng(seed)
    a = rng.uniform(-1, 1, (m, k)).astype(np.float32)
    b = rng.uniform(-1, 1, (k, n)).astype(np.float32)
    kern = await dev.kernel("matmul_f32")
    ba, bb = dev.upload(a, "selftest.a"), dev.upload(b, "selftest.b")
    bc = dev.create_buffer(m * n * 4, "selftest.c")
    batch = dev.batch("selftest")
    batch.dispatch(kern, (-(-n // 16), -(-m // 16)), a=ba, b=bb, c=bc, m=m, n=n, k=k)
    batch.read(bc)
    (raw,) = await batch.run()
    c = np.frombuffer(raw, np.float32, m * n).reshape(m, n)
    for buf in (ba, bb, bc):
        dev.destroy_buffer(buf)
    ref = a.astype(np.float64) @ b.astype(np.float64)
    scale = max(1.0, float((np.abs(a).astype(np.float64) @ np.abs(b).astype(np.float64)).max()))
    tol = (k + 1) * float(np.finfo(np.float32).eps) * scale
    err = float(np.abs(c - ref).max())
    return {
        "m": m, "n": n, "k": k,
        "a": a.ravel().tolist(), "b": b.ravel().tolist(), "c": c.ravel().tolist(),
        "max_abs_err": err, "tolerance": tol, "ok": bool(np.isfinite(err) and err <= tol),
        "kernel": "matmul_f32",
    }
