"""The model kernels as Python calls that record dispatches into a Batch.

Same code on both backends. Every op takes buffers and shapes (element offsets and row
strides let ops read slices of fused buffers, e.g. Q, K, V of one QKV matvec output),
checks that the buffers cover what the kernel will touch (WebGPU clamps out-of-bounds
accesses silently, so a wrong size would give wrong numbers, not an error), packs the
uniform struct and picks the grid. Kernels are compiled once in `Ops.create`.

Weights stay in their GGUF blocks on the GPU (`dev.upload(raw_bytes)`). Tensors that feed
the same input can share one buffer by concatenating their raw bytes: rows of a quantized
matrix are whole blocks, so wq|wk|wv bytes form one [(n_head + 2 n_kv) * head_dim, dim]
matrix and one matvec computes Q, K and V; likewise gate|up.

A Llama decode step in 6 dispatches per layer (tests/native/test_gpu_layer.py does this):
    matvec(wqkv, h -> qkv, norm_weight=attn_norm)        RMSNorm fused into the input
    rope_kv(qkv, cache)                                   RoPE on Q and K, K/V appended
    attention(qkv -> att)                                 (+1 combine dispatch on long contexts)
    matvec(wo, att -> h, accumulate=True)                 residual add fused
    matvec(wgate|up, h -> gu, norm_weight=ffn_norm)
    matvec(wdown, gu -> h, silu_up_off=ffn, accumulate=True)   SwiGLU and residual fused
plus embed first and matvec(token_embd, h, norm_weight=output_norm) + argmax last.
Prefill uses rmsnorm / matmul / rope_kv / attention(n_tokens=n) / silu_mul / matmul(accumulate).

CPU adapters (dev.info["cpu_adapter"]: lavapipe, SwiftShader; or cpu_kernels=True) get other
kernels behind the same calls (cpu_kernels.py explains why), none with workgroup barriers:
  * matvec / matmul for Q4_0, Q4_1, Q8_0 (k a multiple of 32 / 64): on first use the matrix is
    repacked once (repack_cpu.wgsl) into an rgba32uint texture of quants + a buffer of f16
    scales, kept by ops beside the model's raw buffer (as many bytes again); every call then
    writes its input, with the RMSNorm or SwiGLU the GPU path fuses, into an ops-owned
    rgba32float texture (xprep_cpu.wgsl: one more dispatch) and runs the texture kernel (16 rows
    per invocation; matmul 8 rows x 4 tokens). `prepare_matrix` repacks ahead of time.
  * attention with one invocation per (query head, token, 32-key split), + attention_combine;
  * argmax in two passes; rmsnorm with one workgroup of 4 per row.
Other types and shapes (K-quants, odd k, over-size textures) use the GPU kernels (TPR 1). The
results agree with the GPU kernels within the tests' tolerances; greedy token ids stay the same.
"""

from __future__ import annotations

import math

from . import cpu_kernels as ck
from .device import Batch, Buffer, Device
from .reference import F16, F32, Q4_0, Q4_1, Q4_K, Q6_K, Q8_0, TYPE_NAMES, row_bytes

MATRIX_TYPES = (Q4_0, Q4_1, Q8_0, Q4_K, Q6_K)  # matvec; matmul (prefill) for the first three
MATMUL_TYPES = (Q4_0, Q4_1, Q8_0)
XMODE_PLAIN, XMODE_RMSNORM, XMODE_SILU = 0, 1, 2  # matvec input transforms (see matvec_*.wgsl)
EMBED_TYPES = (F32, F16, Q4_0, Q4_1, Q8_0)


def split_grid(n_workgroups: int, limit: int = 65535) -> tuple[int, int, int]:
    """A 1-D count of workgroups as (x, y, 1) within the per-dimension limit; kernels use x + y * nx."""
    if n_workgroups <= limit:
        return (n_workgroups, 1, 1)
    return (limit, -(-n_workgroups // limit), 1)


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _need(buf: Buffer, n_f32: int, what: str) -> None:
    if n_f32 * 4 > buf.size:
        raise ValueError(f"{what}: needs {n_f32 * 4} B but {buf} holds {buf.size} B")


CPU_MATVEC_WG = 8  # invocations per workgroup of the CPU matvec / matmul: lavapipe's SIMD width...
CPU_MATVEC_WG_SWIFTSHADER = 4  # ... and SwiftShader's (more, smaller workgroups balance its threads)
CPU_ARGMAX_PARTS = 256  # invocations of the first argmax pass on CPU adapters
CPU_ATTENTION_WG = 4  # invocations (query heads) per workgroup of the CPU attention


def cpu_workgroup_size(dev: Device) -> int:
    """Invocations per workgroup for the CPU matvec on this adapter: its SIMD width."""
    name = f"{dev.info.get('architecture', '')} {dev.info.get('device', '')}".lower()
    return CPU_MATVEC_WG_SWIFTSHADER if "swiftshader" in name else CPU_MATVEC_WG


class Ops:
    def __init__(self, dev: Device, kernels: dict, attention_wg: int, matvec_tpr: int,
                 attention_split_len: int | None, cpu: bool = False):
        self.dev = dev
        self.k = kernels
        self.attention_wg = attention_wg
        self.matvec_tpr = matvec_tpr
        self.attention_split_len = attention_split_len
        self.cpu = cpu  # CPU-adapter kernels (see the module docstring)
        self._scratch: Buffer | None = None  # split-K attention partials
        self._bufs: dict = {}  # other ops-owned scratch buffers and textures, by purpose
        self._packs: dict = {}  # (weight buffer uid, qtype, rows, k) -> CPU matvec repack or None
        self.cpu_attention_head_dim: int | None = None  # head_dim of the compiled CPU attention
        self.cpu_attention_group = 1  # query heads per invocation of it

    def _scratch_buf(self, purpose: str, nbytes: int) -> Buffer:
        """An ops-owned buffer of at least nbytes for `purpose`, grown (never shrunk) on demand.
        Dispatches of one pass run in order, so consecutive ops may reuse it. A grown-out buffer
        is dropped, not destroyed: a batch not yet submitted may still use it."""
        buf = self._bufs.get(purpose)
        if buf is None or buf.size < nbytes:
            buf = self._bufs[purpose] = self.dev.create_buffer(max(nbytes, 2 * buf.size if buf else 0, 4096),
                                                               f"ops-{purpose}")
        return buf

    @classmethod
    async def create(cls, dev: Device, head_dim: int = 64, matrix_types=(Q4_1, Q8_0),
                     embed_types=(Q8_0,), matvec_tpr: int | None = None,
                     attention_split_len: int | None = 64, cpu_kernels: bool | None = None,
                     attention_group: int = 1) -> "Ops":
        """Compile every kernel the model needs, once, at load time.

        matvec_tpr: threads sharing one matrix row (a power of two <= 256) in the GPU matvec
        kernels. Default 16 on GPUs; 1 on CPU adapters (lavapipe, SwiftShader), where workgroup
        barriers are expensive; there it only serves the types and shapes the CPU kernels lack.
        attention_split_len: decode attention over more than twice this many keys is split
        across workgroups of this many keys each, plus a combine pass (None: never split).
        cpu_kernels: use the CPU-adapter kernels (module docstring); default: on CPU adapters.
        attention_group: query heads per invocation of the CPU attention, sharing their KV head's
        loads (must divide n_heads / n_kv_heads of the calls, else the GPU kernel runs); > 1 makes
        a larger kernel, slower to compile on SwiftShader (cpu_kernels.attention_source).
        """
        cpu = bool(dev.info.get("cpu_adapter")) if cpu_kernels is None else bool(cpu_kernels)
        if matvec_tpr is None:
            matvec_tpr = 1 if dev.info.get("cpu_adapter") or cpu else 16
        attention_wg = max(64, 1 << (head_dim - 1).bit_length())
        kernels = {
            "rmsnorm": await dev.kernel("rmsnorm"),
            "rope": await dev.kernel("rope"),
            "kv_store": await dev.kernel("kv_store"),
            "rope_kv": await dev.kernel("rope_kv"),
            "attention": await dev.kernel("attention", WG=attention_wg),
            "attention_partial": await dev.kernel("attention", WG=attention_wg, PARTIAL=1),
            "attention_combine": await dev.kernel("attention_combine", WG=attention_wg),
            "silu_mul": await dev.kernel("silu_mul"),
            "add": await dev.kernel("add"),
            "argmax": await dev.kernel("argmax"),
        }
        for t in embed_types:
            kernels[f"embed_{t}"] = await dev.kernel("embed", QTYPE=t)
        for t in matrix_types:
            for mode in (XMODE_PLAIN, XMODE_RMSNORM, XMODE_SILU):
                kernels[f"matvec_{t}_{mode}"] = await dev.kernel(f"matvec_{TYPE_NAMES[t]}", TPR=matvec_tpr, XMODE=mode)
            if t in MATMUL_TYPES:
                kernels[f"matmul_{t}"] = await dev.kernel(f"matmul_{TYPE_NAMES[t]}")
        if cpu:
            for t in matrix_types:
                if t in ck.CPU_MATVEC_TYPES:
                    name = ck.register(ck.matvec_name(t), ck.matvec_source(t))
                    kernels[f"matvec_cpu_{t}"] = await dev.kernel(name, WG=cpu_workgroup_size(dev))
                    kernels[f"repack_cpu_{t}"] = await dev.kernel("repack_cpu", QTYPE=t)
                    name = ck.register(ck.matmul_name(t), ck.matmul_source(t))
                    kernels[f"matmul_cpu_{t}"] = await dev.kernel(name, WG=cpu_workgroup_size(dev))
            for mode in (XMODE_PLAIN, XMODE_RMSNORM, XMODE_SILU):
                kernels[f"xprep_cpu_{mode}"] = await dev.kernel("xprep_cpu", MODE=mode)
            kernels["rmsnorm_cpu"] = await dev.kernel("rmsnorm_cpu")
            kernels["argmax_cpu_0"] = await dev.kernel("argmax_cpu", STAGE=0)
            kernels["argmax_cpu_1"] = await dev.kernel("argmax_cpu", STAGE=1, WG=1)
            if head_dim % 4 == 0:
                name = ck.register(ck.attention_name(head_dim, attention_group),
                                   ck.attention_source(head_dim, attention_group))
                kernels["attention_cpu"] = await dev.kernel(name, WG=CPU_ATTENTION_WG)
        ops = cls(dev, kernels, attention_wg, matvec_tpr, attention_split_len, cpu)
        ops.cpu_attention_head_dim = head_dim if "attention_cpu" in kernels else None
        ops.cpu_attention_group = attention_group
        return ops

    def _kernel(self, key: str, what: str):
        if key not in self.k:
            raise ValueError(f"{what} was not compiled: pass its type to Ops.create")
        return self.k[key]

    def embed(self, b: Batch, ids: Buffer, table: Buffer, out: Buffer, *, qtype: int, n_tokens: int,
              dim: int, out_off: int = 0) -> None:
        """out[out_off + t * dim ...] = row ids[t] of table (raw GGUF rows of qtype) as f32."""
        _need(ids, n_tokens, "embed ids")
        _need(out, out_off + n_tokens * dim, "embed out")
        row_bytes(qtype, dim)
        k = self._kernel(f"embed_{qtype}", f"embed for {TYPE_NAMES.get(qtype, qtype)}")
        b.dispatch(k, split_grid(_cdiv(n_tokens * dim, 256)), ids=ids, table=table, out=out,
                   n_tokens=n_tokens, dim=dim, out_off=out_off)

    def rmsnorm(self, b: Batch, x: Buffer, w: Buffer, out: Buffer, *, n_rows: int, n: int, eps: float) -> None:
        """out (n_rows, n) = rmsnorm(x (n_rows, n)) * w (n,)."""
        _need(x, n_rows * n, "rmsnorm x")
        _need(w, n, "rmsnorm weight")
        _need(out, n_rows * n, "rmsnorm out")
        if self.cpu:
            b.dispatch(self.k["rmsnorm_cpu"], (n_rows, 1, 1), x=x, w=w, out=out, n=n, eps=eps, x_off=0, out_off=0)
            return
        b.dispatch(self.k["rmsnorm"], (n_rows, 1, 1), x=x, w=w, out=out, n=n, eps=eps)

    def rope(self, b: Batch, x: Buffer, *, n_tokens: int, n_heads: int, head_dim: int, pos0: int,
             base: float, neox: bool, row_stride: int | None = None, x_off: int = 0,
             n_rot: int | None = None, freq_scale: float = 1.0) -> None:
        """Rotate heads [n_heads, head_dim] at x_off of each of n_tokens rows, in place."""
        row_stride = n_heads * head_dim if row_stride is None else row_stride
        n_rot = head_dim if n_rot is None else n_rot
        if n_rot % 2 or n_rot > head_dim:
            raise ValueError(f"rope: n_rot {n_rot} must be even and <= head_dim {head_dim}")
        _need(x, (n_tokens - 1) * row_stride + x_off + n_heads * head_dim, "rope x")
        b.dispatch(self.k["rope"], split_grid(_cdiv(n_tokens * n_heads * n_rot // 2, 256)), x=x,
                   n_tokens=n_tokens, n_heads=n_heads, head_dim=head_dim, n_rot=n_rot, row_stride=row_stride,
                   x_off=x_off, pos0=pos0, neox=int(bool(neox)), base=base, freq_scale=freq_scale)

    def kv_store(self, b: Batch, src: Buffer, cache: Buffer, *, n_tokens: int, n_heads: int, head_dim: int,
                 ctx: int, pos0: int, src_stride: int | None = None, src_off: int = 0, cache_off: int = 0) -> None:
        """cache[cache_off:] as (n_heads, ctx, head_dim): positions pos0.. get the heads of src rows."""
        if pos0 + n_tokens > ctx:
            raise ValueError(f"kv_store: positions {pos0}..{pos0 + n_tokens - 1} exceed context {ctx}")
        src_stride = n_heads * head_dim if src_stride is None else src_stride
        _need(src, (n_tokens - 1) * src_stride + src_off + n_heads * head_dim, "kv_store src")
        _need(cache, cache_off + n_heads * ctx * head_dim, "kv_store cache")
        b.dispatch(self.k["kv_store"], split_grid(_cdiv(n_tokens * n_heads * head_dim, 256)), src=src, cache=cache,
                   n_tokens=n_tokens, n_heads=n_heads, head_dim=head_dim, src_stride=src_stride, src_off=src_off,
                   ctx=ctx, pos0=pos0, cache_off=cache_off)

    def rope_kv(self, b: Batch, qkv: Buffer, cache: Buffer, *, n_tokens: int, n_heads: int, n_kv_heads: int,
                head_dim: int, ctx: int, pos0: int, base: float, neox: bool, k_off: int, v_off: int,
                row_stride: int | None = None, x_off: int = 0, n_rot: int | None = None,
                freq_scale: float = 1.0) -> None:
        """Fused: RoPE on the Q heads of fused QKV rows (in place) and on K, then K and V of tokens
        pos0.. into the cache (K heads at k_off, V heads at v_off, each (n_kv_heads, ctx, head_dim))."""
        n_all = n_heads + 2 * n_kv_heads
        row_stride = n_all * head_dim if row_stride is None else row_stride
        n_rot = head_dim if n_rot is None else n_rot
        if n_rot % 2 or n_rot > head_dim or head_dim % 2:
            raise ValueError(f"rope_kv: n_rot {n_rot} and head_dim {head_dim} must be even, n_rot <= head_dim")
        if pos0 + n_tokens > ctx:
            raise ValueError(f"rope_kv: positions {pos0}..{pos0 + n_tokens - 1} exceed context {ctx}")
        _need(qkv, (n_tokens - 1) * row_stride + x_off + n_all * head_dim, "rope_kv qkv")
        _need(cache, max(k_off, v_off) + n_kv_heads * ctx * head_dim, "rope_kv cache")
        b.dispatch(self.k["rope_kv"], split_grid(_cdiv(n_tokens * n_all * head_dim // 2, 256)), qkv=qkv, cache=cache,
                   n_tokens=n_tokens, n_heads=n_heads, n_kv_heads=n_kv_heads, head_dim=head_dim, n_rot=n_rot,
                   row_stride=row_stride, x_off=x_off, pos0=pos0, ctx=ctx, k_off=k_off, v_off=v_off,
                   neox=int(bool(neox)), base=base, freq_scale=freq_scale)

    def attention(self, b: Batch, q: Buffer, kv: Buffer, out: Buffer, *, n_tokens: int, n_heads: int,
                  n_kv_heads: int, head_dim: int, ctx: int, pos0: int, k_off: int, v_off: int,
                  q_stride: int | None = None, q_off: int = 0, out_stride: int | None = None,
                  out_off: int = 0, scale: float | None = None) -> None:
        """out (n_tokens, n_heads * head_dim) = causal GQA of q over cache positions 0..pos0+t."""
        if n_heads % n_kv_heads:
            raise ValueError(f"attention: n_heads {n_heads} is not a multiple of n_kv_heads {n_kv_heads}")
        if head_dim > self.attention_wg:
            raise ValueError(f"attention: head_dim {head_dim} > {self.attention_wg}; pass head_dim to Ops.create")
        if pos0 + n_tokens > ctx:
            raise ValueError(f"attention: positions up to {pos0 + n_tokens - 1} exceed context {ctx}")
        q_stride = n_heads * head_dim if q_stride is None else q_stride
        out_stride = n_heads * head_dim if out_stride is None else out_stride
        _need(q, (n_tokens - 1) * q_stride + q_off + n_heads * head_dim, "attention q")
        _need(kv, max(k_off, v_off) + n_kv_heads * ctx * head_dim, "attention kv cache")
        _need(out, (n_tokens - 1) * out_stride + out_off + n_heads * head_dim, "attention out")
        if head_dim % 4 or k_off % 4:
            raise ValueError(f"attention: head_dim {head_dim} and k_off {k_off} must be multiples of 4")
        scale = 1.0 / math.sqrt(head_dim) if scale is None else scale
        args = dict(q=q, kv=kv, n_tokens=n_tokens, n_heads=n_heads, n_kv_heads=n_kv_heads, head_dim=head_dim,
                    q_stride=q_stride, q_off=q_off, ctx=ctx, k_off=k_off, v_off=v_off, pos0=pos0,
                    out_stride=out_stride, out_off=out_off, scale=scale)
        if (self.cpu and head_dim == self.cpu_attention_head_dim
                and (n_heads // n_kv_heads) % self.cpu_attention_group == 0 and v_off % 4 == 0):
            self._attention_cpu(b, dict(args, out=out))
            return
        split = self.attention_split_len
        n_keys = pos0 + n_tokens
        if n_tokens == 1 and split and n_keys > 2 * split:
            n_splits = _cdiv(n_keys, split)
            need = n_heads * n_splits * (head_dim + 2) * 4
            if self._scratch is None or self._scratch.size < need:
                self._scratch = self.dev.create_buffer(max(need, 2 * (self._scratch.size if self._scratch else 0)),
                                                       "attention-partials")
            b.dispatch(self.k["attention_partial"], (n_heads, 1, n_splits), out=self._scratch, split_len=split,
                       n_splits=n_splits, **args)
            b.dispatch(self.k["attention_combine"], (n_heads, 1, 1), part=self._scratch, out=out, n_heads=n_heads,
                       head_dim=head_dim, n_splits=n_splits, out_stride=out_stride, out_off=out_off)
        else:
            b.dispatch(self.k["attention"], (n_heads, n_tokens, 1), out=out, split_len=ctx, n_splits=1, **args)

    def _attention_cpu(self, b: Batch, args: dict) -> None:
        """One invocation per (cpu_attention_group query heads, token, split of ATTN_SPLIT keys)
        (cpu_kernels.py); several splits go through the partials buffer and attention_combine."""
        n_tokens, n_heads, hd = args["n_tokens"], args["n_heads"], args["head_dim"]
        split = ck.ATTN_SPLIT
        n_splits = _cdiv(args["pos0"] + n_tokens, split)
        kern = self.k["attention_cpu"]
        gx = _cdiv(n_heads // self.cpu_attention_group, CPU_ATTENTION_WG)
        if n_splits == 1:
            b.dispatch(kern, (gx, n_tokens, 1), split_len=split, n_splits=1, **args)
            return
        out, out_stride, out_off = args["out"], args["out_stride"], args["out_off"]
        part = self._scratch_buf("attention-partials", n_tokens * n_heads * n_splits * (hd + 2) * 4)
        b.dispatch(kern, (gx, n_tokens, n_splits), split_len=split, n_splits=n_splits, **dict(args, out=part))
        b.dispatch(self.k["attention_combine"], (n_heads, n_tokens, 1), part=part, out=out, n_heads=n_heads,
                   head_dim=hd, n_splits=n_splits, out_stride=out_stride, out_off=out_off)

    def silu_mul(self, b: Batch, gu: Buffer, out: Buffer, *, n_tokens: int, n: int, in_stride: int | None = None,
                 gate_off: int = 0, up_off: int | None = None) -> None:
        """out (n_tokens, n) = silu(gate) * up; default layout is a fused gate|up row of 2n."""
        in_stride = 2 * n if in_stride is None else in_stride
        up_off = n if up_off is None else up_off
        _need(gu, (n_tokens - 1) * in_stride + max(gate_off, up_off) + n, "silu_mul input")
        _need(out, n_tokens * n, "silu_mul out")
        b.dispatch(self.k["silu_mul"], split_grid(_cdiv(n_tokens * n, 256)), gu=gu, out=out, n_tokens=n_tokens,
                   n=n, in_stride=in_stride, gate_off=gate_off, up_off=up_off)

    def add(self, b: Batch, a: Buffer, other: Buffer, *, n: int, a_off: int = 0, b_off: int = 0) -> None:
        """a[a_off:a_off+n] += other[b_off:b_off+n]."""
        _need(a, a_off + n, "add a")
        _need(other, b_off + n, "add b")
        b.dispatch(self.k["add"], split_grid(_cdiv(n, 256)), a=a, b=other, n=n, a_off=a_off, b_off=b_off)

    def _packed(self, w: Buffer, qtype: int, rows: int, k: int):
        """(quants texture, scales buffer, texels per row) of matrix w for the CPU matvec, repacked on first use by
        a dispatch submitted at once (so before any batch that uses it); None where the CPU
        matvec does not apply (type, k, or a texture over the device's size limit)."""
        key = (w.uid, qtype, rows, k)
        if key in self._packs:
            return self._packs[key]
        pack = None
        if f"matvec_cpu_{qtype}" in self.k and k % ck.matvec_k_multiple(qtype) == 0:
            per_unit, texels = ck.matvec_unit_texels(qtype)
            units = k // per_unit
            tpr = units * texels
            limit = int(self.dev.info["limits"].get("maxTextureDimension2D", 8192))
            height = min(rows, limit)
            width = _cdiv(rows, height) * tpr
            if width <= limit and k // 4 <= limit:
                tex = self.dev.create_texture(width, height, "rgba32uint", f"{w.label}-cpu")
                scales = self.dev.create_buffer(rows * units * 4, f"{w.label}-cpu-scales")
                rb = self.dev.batch("repack")
                rb.dispatch(self.k[f"repack_cpu_{qtype}"], split_grid(_cdiv(rows * units, 64)), w=w, d=scales, qt=tex,
                            rows=rows, units=units, H=height, tpr=tpr)
                rb.submit()
                pack = (tex, scales, tpr)
        self._packs[key] = pack
        return pack

    def prepare_matrix(self, w: Buffer, qtype: int, rows: int, k: int) -> bool:
        """Repack matrix w now for the CPU-adapter matvec (else its first matvec does); True if
        matvecs of it will use the CPU kernels. The raw buffer stays in use by matmul and by the
        GPU kernels; the repacked copy holds as many bytes again."""
        self._check_matrix("prepare_matrix", w, qtype, rows, k)
        return self.cpu and self._packed(w, qtype, rows, k) is not None

    def _x_texture(self, k: int, n_tokens: int = 1):
        """The ops-owned rgba32float texture that holds a CPU matvec's input (k / 4 texels), or a
        CPU matmul's (one row per token); grown, never shrunk (dropped, not destroyed: a batch not
        yet submitted may still use the old one)."""
        key = "x-texture" if n_tokens == 1 else "xs-texture"
        tex = self._bufs.get(key)
        if tex is None or tex.width * 4 < k or tex.height < n_tokens:
            limit = int(self.dev.info["limits"].get("maxTextureDimension2D", 8192))
            width = min(max(k // 4, tex.width if tex is not None else 0, 256), limit)
            height = min(max(n_tokens, 2 * tex.height if tex is not None and n_tokens > 1 else 1), limit)
            tex = self._bufs[key] = self.dev.create_texture(width, height, "rgba32float", f"ops-{key}")
        return tex

    def _check_matrix(self, op: str, w: Buffer, qtype: int, rows: int, k: int) -> None:
        if qtype not in MATRIX_TYPES:
            raise ValueError(f"{op}: no kernel for GGML type {TYPE_NAMES.get(qtype, qtype)}; have "
                             f"{[TYPE_NAMES[t] for t in MATRIX_TYPES]}")
        nbytes = rows * row_bytes(qtype, k)
        if nbytes > w.size:
            raise ValueError(f"{op}: [{rows}, {k}] {TYPE_NAMES[qtype]} needs {nbytes} B but {w} holds {w.size} B")

    def matvec(self, b: Batch, w: Buffer, x: Buffer, y: Buffer, *, qtype: int, rows: int, k: int,
               x_off: int = 0, y_off: int = 0, accumulate: bool = False, norm_weight: Buffer | None = None,
               eps: float = 1e-5, silu_up_off: int | None = None) -> None:
        """y[y_off:y_off+rows] (+)= W (rows, k) · xin, W in raw GGUF blocks, where xin is
        x[x_off:x_off+k], or rmsnorm(that) * norm_weight (fused RMSNorm, `norm_weight` given), or
        silu(that) * x[silu_up_off:silu_up_off+k] (fused SwiGLU, `silu_up_off` given).
        accumulate=True adds into y (a fused residual add)."""
        self._check_matrix("matvec", w, qtype, rows, k)
        if norm_weight is not None and silu_up_off is not None:
            raise ValueError("matvec: fuse RMSNorm or SwiGLU into the input, not both")
        mode = XMODE_RMSNORM if norm_weight is not None else XMODE_SILU if silu_up_off is not None else XMODE_PLAIN
        up_off = 0 if silu_up_off is None else silu_up_off
        if x_off % 4 or up_off % 4:
            raise ValueError(f"matvec: x_off {x_off} and silu_up_off {up_off} must be multiples of 4 (read as vec4)")
        _need(x, max(x_off, up_off) + k, "matvec x")
        _need(y, y_off + rows, "matvec y")
        if norm_weight is not None:
            _need(norm_weight, k, "matvec norm weight")
        pack = self._packed(w, qtype, rows, k) if self.cpu else None
        if pack is not None:  # CPU adapters: input prepared into a texture, then the texture matvec
            tex, scales, tpr = pack
            xt = self._x_texture(k)
            b.dispatch(self.k[f"xprep_cpu_{mode}"], (1, 1, 1), x=x, nw=x if norm_weight is None else norm_weight,
                       xt=xt, k=k, x_off=x_off, up_off=up_off, eps=eps, x_stride=0)
            lanes = _cdiv(rows, ck.ROWS_PER_LANE)
            kern = self.k[f"matvec_cpu_{qtype}"]
            b.dispatch(kern, split_grid(_cdiv(lanes, dict(kern.constants)["WG"])), qt=tex, d=scales,
                       xt=xt, y=y, rows=rows, k=k, y_off=y_off, acc=int(accumulate), H=tex.height, tpr=tpr)
            return
        kern = self._kernel(f"matvec_{qtype}_{mode}", f"matvec {TYPE_NAMES[qtype]}")
        b.dispatch(kern, split_grid(_cdiv(rows, 256 // self.matvec_tpr)), w=w, x=x, y=y,
                   nw=x if norm_weight is None else norm_weight, rows=rows, k=k, x_off=x_off, y_off=y_off,
                   acc=int(accumulate), up_off=up_off, eps=eps)

    def matmul(self, b: Batch, w: Buffer, x: Buffer, y: Buffer, *, qtype: int, n_tokens: int, rows: int, k: int,
               x_stride: int | None = None, x_off: int = 0, y_stride: int | None = None, y_off: int = 0,
               accumulate: bool = False) -> None:
        """Y[t, y_off + r] (+)= sum_i X[t, x_off + i] W[r, i]: the prefill form of matvec."""
        self._check_matrix("matmul", w, qtype, rows, k)
        x_stride = k if x_stride is None else x_stride
        y_stride = rows if y_stride is None else y_stride
        _need(x, (n_tokens - 1) * x_stride + x_off + k, "matmul x")
        _need(y, (n_tokens - 1) * y_stride + y_off + rows, "matmul y")
        if qtype not in MATMUL_TYPES:
            raise ValueError(f"matmul: no prefill kernel for {TYPE_NAMES[qtype]} yet; have "
                             f"{[TYPE_NAMES[t] for t in MATMUL_TYPES]} (matvec per token works for it)")
        pack = self._packed(w, qtype, rows, k) if self.cpu and f"matmul_cpu_{qtype}" in self.k else None
        limit = int(self.dev.info["limits"].get("maxTextureDimension2D", 8192))
        if pack is not None and n_tokens <= limit:  # CPU adapters: X into a texture, then the texture matmul
            tex, scales, tpr = pack
            xt = self._x_texture(k, n_tokens)
            b.dispatch(self.k[f"xprep_cpu_{XMODE_PLAIN}"], (n_tokens, 1, 1), x=x, nw=x, xt=xt, k=k, x_off=x_off,
                       up_off=0, eps=0.0, x_stride=x_stride)
            lanes = _cdiv(rows, ck.MATMUL_ROWS)
            kern = self.k[f"matmul_cpu_{qtype}"]
            gx, gy, _ = split_grid(_cdiv(lanes, dict(kern.constants)["WG"]))
            b.dispatch(kern, (gx, gy, _cdiv(n_tokens, ck.MATMUL_TOKENS)), qt=tex, d=scales,
                       xt=xt, y=y, rows=rows, k=k, n_tokens=n_tokens, y_stride=y_stride, y_off=y_off,
                       acc=int(accumulate), H=tex.height, tpr=tpr)
            return
        kern = self._kernel(f"matmul_{qtype}", f"matmul {TYPE_NAMES[qtype]}")
        b.dispatch(kern, (_cdiv(rows, 64), _cdiv(n_tokens, 32), 1), w=w, x=x, y=y, n_tokens=n_tokens, rows=rows,
                   k=k, x_stride=x_stride, x_off=x_off, y_stride=y_stride, y_off=y_off, acc=int(accumulate))

    def argmax(self, b: Batch, x: Buffer, out: Buffer, *, n: int, x_off: int = 0) -> None:
        """out[0] = argmax x[x_off:x_off+n] (u32), out[1] = its f32 bits."""
        _need(x, x_off + n, "argmax x")
        _need(out, 2, "argmax out")
        if self.cpu:
            parts = min(CPU_ARGMAX_PARTS, n)
            chunk = _cdiv(n, parts)
            parts = _cdiv(n, chunk)
            part = self._scratch_buf("argmax-partials", parts * 8)
            args = dict(x=x, part=part, out=out, n=n, x_off=x_off, chunk=chunk, n_parts=parts)
            b.dispatch(self.k["argmax_cpu_0"], (_cdiv(parts, 64), 1, 1), **args)
            b.dispatch(self.k["argmax_cpu_1"], (1, 1, 1), **args)
            return
        b.dispatch(self.k["argmax"], (1, 1, 1), x=x, out=out, n=n, x_off=x_off)
