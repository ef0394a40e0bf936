"""GET /api/ggml-rope: llama.cpp's RoPE cos/sin table, computed here with the C library.

numerics="ggml" reproduces llama.cpp bit for bit, and llama.cpp takes its RoPE angles from the
C library's powf and sincosf (ggml_rope_cache_init). glibc's sincosf is not correctly rounded
(~2% of the angles differ from the nearest float) and a tab has no glibc (Pyodide's libm is
another one), so the tab asks the server, which calls the real one through ctypes
(tabmesh.model.ggml_numerics.rope_tables).

    GET /api/ggml-rope?base=100000&n_rot=64&freq_scale=1&n=2048
    -> application/octet-stream: cos (n, n_rot / 2) then sin (n, n_rot / 2), float32 LE
       X-Tabmesh-Libm: glibc | other   (other: the table is correctly rounded, not glibc's)

Parameters are validated (400 with the reason); tables are bounded (n * n_rot <= 2^22, i.e. at
most 16 MiB) and the last few are cached.
"""

from __future__ import annotations

import asyncio
import functools
import math
import platform

import numpy as np
from aiohttp import web

MAX_ELEMS = 1 << 22


def _param(request: web.Request, name: str, kind, lo: float, hi: float):
    raw = request.query.get(name)
    if raw is None:
        raise web.HTTPBadRequest(text=f"missing query parameter {name!r}")
    try:
        value = kind(raw)
    except ValueError:
        raise web.HTTPBadRequest(text=f"{name}={raw[:40]!r} is not a {kind.__name__}") from None
    if not (isinstance(value, int) or math.isfinite(value)) or not lo <= value <= hi:
        raise web.HTTPBadRequest(text=f"{name}={value} is outside [{lo}, {hi}]")
    return value


@functools.lru_cache(maxsize=4)
def rope_table(base: float, n_rot: int, freq_scale: float, n: int) -> bytes:
    from tabmesh.model.ggml_numerics import rope_cos_sin

    cos, sin = rope_cos_sin(base, n_rot, freq_scale, n)
    return np.concatenate([cos.reshape(-1), sin.reshape(-1)]).astype("<f4").tobytes()


def libm_name() -> str:
    from tabmesh.model.ggml_numerics import _libm

    return "glibc" if platform.libc_ver()[0] == "glibc" and _libm() is not None else "other"


async def rope_handler(request: web.Request) -> web.Response:
    base = _param(request, "base", float, 1.0, 1e12)
    n_rot = _param(request, "n_rot", int, 2, 1024)
    freq_scale = _param(request, "freq_scale", float, 1e-6, 1e6)
    n = _param(request, "n", int, 1, 1 << 20)
    if n_rot % 2 or n * n_rot > MAX_ELEMS:
        raise web.HTTPBadRequest(text=f"n_rot must be even and n * n_rot at most {MAX_ELEMS}")
    body = await asyncio.to_thread(rope_table, base, n_rot, freq_scale, n)
    return web.Response(body=body, content_type="application/octet-stream",
                        headers={"X-Tabmesh-Libm": libm_name(), "Cache-Control": "max-age=86400"})


def install(app: web.Application) -> None:
    app.router.add_get("/api/ggml-rope", rope_handler)
