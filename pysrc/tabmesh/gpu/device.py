"""Backend-neutral device: buffers, kernel (pipeline) cache, batched dispatch, readback.

A backend (native.py for wgpu-py, browser.py for the JS WebGPU API under Pyodide)
implements only the primitives marked "backend" below; everything else (caches,
uniform packing, validation of a dispatch) lives here and runs the same in both.

Batches: `dev.batch()` records dispatches in Python; `submit()`/`run()` encodes them into
ONE command encoder and ONE compute pass, then optional buffer copies for readback, and
submits once. Per-dispatch uniforms are packed into one uniform "ring" buffer written with
a single writeBuffer just before the submit; each dispatch points at its 256-byte slot
through a dynamic offset, so bind groups depend only on the buffers and are cached.
Queue order makes reusing the ring safe: a writeBuffer issued after an earlier submit
executes after that submit's commands.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

from .errors import GPUError
from .kernels import KernelInterface, load_wgsl, parse_interface

# WebGPU GPUBufferUsage values (the spec's numbers; wgpu-py uses the same).
MAP_READ = 0x1
COPY_SRC = 0x4
COPY_DST = 0x8
UNIFORM = 0x40
STORAGE = 0x80
# GPUTextureUsage values.
TEX_COPY_DST = 0x2
TEX_BINDING = 0x4
TEX_STORAGE = 0x8
TEXEL_BYTES = {"rgba32uint": 16, "rgba32float": 16, "rgba32sint": 16, "r32uint": 4, "r32float": 4}

UNIFORM_SLOT = 256  # >= any device's minUniformBufferOffsetAlignment (spec max is 256)

# The WebGPU limits reported in dev.info, spelled as in the JS API (MDN applies).
LIMIT_NAMES = (
    "maxTextureDimension1D", "maxTextureDimension2D", "maxTextureDimension3D", "maxTextureArrayLayers",
    "maxBindGroups", "maxBindGroupsPlusVertexBuffers", "maxBindingsPerBindGroup",
    "maxDynamicUniformBuffersPerPipelineLayout", "maxDynamicStorageBuffersPerPipelineLayout",
    "maxSampledTexturesPerShaderStage", "maxSamplersPerShaderStage", "maxStorageBuffersPerShaderStage",
    "maxStorageTexturesPerShaderStage", "maxUniformBuffersPerShaderStage", "maxUniformBufferBindingSize",
    "maxStorageBufferBindingSize", "minUniformBufferOffsetAlignment", "minStorageBufferOffsetAlignment",
    "maxVertexBuffers", "maxBufferSize", "maxVertexAttributes", "maxVertexBufferArrayStride",
    "maxInterStageShaderVariables", "maxColorAttachments", "maxColorAttachmentBytesPerSample",
    "maxComputeWorkgroupStorageSize", "maxComputeInvocationsPerWorkgroup", "maxComputeWorkgroupSizeX",
    "maxComputeWorkgroupSizeY", "maxComputeWorkgroupSizeZ", "maxComputeWorkgroupsPerDimension",
)

# Limits raised to the adapter's maximum when the device is requested (defaults are small:
# 128 MiB per storage binding, 16 KiB workgroup memory, 8 storage buffers per stage).
REQUESTED_LIMITS = (
    "maxBufferSize", "maxStorageBufferBindingSize", "maxComputeWorkgroupStorageSize",
    "maxStorageBuffersPerShaderStage", "maxComputeInvocationsPerWorkgroup", "maxComputeWorkgroupSizeX",
    "maxTextureDimension2D",
)

# Optional features requested when the adapter has them (spelling of the JS API; native
# wgpu spells subgroups "subgroup"). Kernels must not depend on them.
WANTED_FEATURES = ("shader-f16", "subgroups", "subgroup", "timestamp-query")

_uids = itertools.count(1)


@dataclass(eq=False)
class Buffer:
    handle: object  # GPUBuffer (wgpu-py object or JS proxy)
    size: int  # bytes, a multiple of 4
    label: str = ""
    uid: int = field(default_factory=lambda: next(_uids))

    def __repr__(self) -> str:
        return f"Buffer({self.label!r}, {self.size} B)"


@dataclass(eq=False)
class Texture:
    """A 2-D texture (one mip level) and its default view; kernels read it with textureLoad
    (`texture_2d<T>`) or write it (`texture_storage_2d<FORMAT, write>`)."""

    handle: object  # GPUTexture
    view: object  # GPUTextureView
    width: int
    height: int
    format: str
    label: str = ""
    uid: int = field(default_factory=lambda: next(_uids))

    @property
    def nbytes(self) -> int:
        return self.width * self.height * TEXEL_BYTES.get(self.format, 16)

    def __repr__(self) -> str:
        return f"Texture({self.label!r}, {self.width}x{self.height} {self.format})"


@dataclass(eq=False)
class Kernel:
    name: str
    constants: tuple  # sorted (name, value) pairs of WGSL override constants
    interface: KernelInterface
    pipeline: object
    layout: object  # GPUBindGroupLayout


def align4(n: int) -> int:
    return (n + 3) & ~3


class Batch:
    """Dispatches recorded now, encoded into one pass and submitted once by submit()/run()."""

    def __init__(self, dev: "Device", label: str = ""):
        self.dev = dev
        self.label = label
        self._dispatches: list = []  # (kernel, buffers tuple, uniform bytes | None, grid)
        self._reads: list = []  # (buffer, offset, nbytes)
        self._done = False

    def dispatch(self, kernel: Kernel, grid, **args) -> None:
        """Record kernel over `grid` workgroups; args name its storage buffers and uniform fields."""
        if self._done:
            raise GPUError("this batch was already submitted; start a new one with dev.batch()")
        iface = kernel.interface
        try:
            bufs = tuple([args.pop(name) for name in iface.storage_names])
        except KeyError:
            missing = [n for n in iface.storage_names if n not in args]
            raise TypeError(f"kernel {kernel.name!r} needs buffers {list(iface.storage_names)}; "
                            f"missing {missing}") from None
        for b, d in zip(bufs, iface.storage):
            if type(b) is not (Texture if d.is_texture else Buffer):
                what = "texture" if d.is_texture else "buffer"
                raise TypeError(f"kernel {kernel.name!r} needs {what} {d.name}= (a {what.title()}), got {b!r}")
        if len(set(bufs)) < len(bufs):
            for i, a in enumerate(iface.storage):
                for j in range(i):
                    if bufs[i] is bufs[j] and (a.writable or iface.storage[j].writable):
                        raise ValueError(f"kernel {kernel.name!r}: {bufs[i]} is bound as both {iface.storage[j].name}"
                                         f" and {a.name} while one is writable (WebGPU forbids that aliasing)")
        ubytes = iface.pack(kernel.name, args) if iface.uniform else None
        if ubytes is None and args:
            raise TypeError(f"kernel {kernel.name!r} takes no uniform fields, got {sorted(args)}")
        if type(grid) is not tuple or len(grid) != 3:
            grid = tuple(int(g) for g in (grid if isinstance(grid, (tuple, list)) else (grid,)))
            grid = grid + (1,) * (3 - len(grid))
        x, y, z = grid
        lim = self.dev.max_workgroups_per_dim
        if not (0 <= x <= lim and 0 <= y <= lim and 0 <= z <= lim):
            raise ValueError(f"kernel {kernel.name!r}: grid {grid} outside 0..{lim} per dimension")
        if x and y and z:
            self._dispatches.append((kernel, bufs, ubytes, grid))

    def read(self, buf: Buffer, offset: int = 0, nbytes: int | None = None) -> int:
        """Copy buf[offset:offset+nbytes] back after the pass; returns the index into run()'s result."""
        nbytes = buf.size - offset if nbytes is None else nbytes
        if offset % 4 or nbytes % 4 or offset + nbytes > buf.size or nbytes <= 0:
            raise ValueError(f"read of {nbytes} B at {offset} from {buf}: offset and size must be multiples of 4 inside it")
        self._reads.append((buf, offset, nbytes))
        return len(self._reads) - 1

    def submit(self) -> None:
        """Submit without waiting (no readback)."""
        if self._reads:
            raise GPUError("batch has reads: use `await batch.run()` to get them")
        self.dev._submit_batch(self)

    async def run(self) -> list[bytes]:
        """Submit, wait, and return the bytes of every read() in order."""
        staging = self.dev._submit_batch(self)
        out = []
        for st, (_, _, nbytes) in zip(staging, self._reads):
            out.append(await self.dev._map_read(st.handle, nbytes))
            self.dev._staging_free.append(st)
        return out


class Device:
    """Common part of a WebGPU device; see module docstring."""

    backend = "abstract"

    def __init__(self, info: dict):
        self.info = info
        limits = info["limits"]
        self.max_workgroups_per_dim = int(limits.get("maxComputeWorkgroupsPerDimension", 65535))
        self.max_storage_binding = int(limits.get("maxStorageBufferBindingSize", 128 << 20))
        self._kernels: dict = {}
        self._bind_groups: dict = {}
        self._ring: Buffer | None = None
        self._staging_free: list[Buffer] = []

    # -- buffers -------------------------------------------------------------------------
    def create_buffer(self, nbytes: int, label: str = "", usage: int = STORAGE | COPY_SRC | COPY_DST) -> Buffer:
        size = max(4, align4(int(nbytes)))
        if usage & STORAGE and size > self.max_storage_binding:
            raise GPUError(f"buffer {label!r} of {size} B exceeds maxStorageBufferBindingSize "
                           f"{self.max_storage_binding} B of this device: split the tensor")
        return Buffer(self._create_buffer(size, usage, label), size, label)

    def upload(self, data, label: str = "") -> Buffer:
        """A storage buffer holding data's bytes (numpy array or bytes-like, uploaded as-is)."""
        mv = memoryview(data).cast("B")
        buf = self.create_buffer(mv.nbytes, label)
        self.write(buf, mv)
        return buf

    def write(self, buf: Buffer, data, offset: int = 0) -> None:
        """Queue a write; it lands before any batch submitted after this call."""
        mv = memoryview(data).cast("B")
        n = mv.nbytes
        if n % 4:
            mv = memoryview(bytes(mv) + b"\0" * (4 - n % 4))
        if offset % 4 or offset + mv.nbytes > buf.size:
            raise ValueError(f"write of {n} B at {offset} into {buf}: offset must be a multiple of 4 and fit")
        if n:
            self._write_buffer(buf.handle, offset, mv)

    def destroy_buffer(self, buf: Buffer) -> None:
        self._bind_groups = {k: v for k, v in self._bind_groups.items() if buf not in k[1] and buf is not k[2]}
        self._destroy_buffer(buf.handle)

    def create_texture(self, width: int, height: int, format: str = "rgba32uint", label: str = "",
                       storage: bool = True) -> Texture:
        """A 2-D texture for textureLoad (and, storage=True, for textureStore from kernels)."""
        limit = int(self.info["limits"].get("maxTextureDimension2D", 8192))
        if not (0 < width <= limit and 0 < height <= limit):
            raise GPUError(f"texture {label!r} of {width}x{height} exceeds maxTextureDimension2D {limit}")
        usage = TEX_BINDING | TEX_COPY_DST | (TEX_STORAGE if storage else 0)
        handle, view = self._create_texture(width, height, format, usage, label)
        return Texture(handle, view, width, height, format, label)

    def destroy_texture(self, tex: Texture) -> None:
        self._bind_groups = {k: v for k, v in self._bind_groups.items() if tex not in k[1]}
        self._destroy_texture(tex.handle)

    async def read(self, buf: Buffer, offset: int = 0, nbytes: int | None = None) -> bytes:
        b = self.batch("read")
        b.read(buf, offset, nbytes)
        return (await b.run())[0]

    # -- kernels -------------------------------------------------------------------------
    async def kernel(self, name: str, **constants) -> Kernel:
        """Kernel wgsl/NAME.wgsl with override constants; compiled once, then cached."""
        key = (name, tuple(sorted(constants.items())))
        k = self._kernels.get(key)
        if k is None:
            source = await load_wgsl(name)
            iface = parse_interface(name, source)
            entries = [(d.binding, d.kind) for d in iface.storage]
            if iface.uniform:
                entries.append((iface.uniform.binding, "uniform"))
            pipeline, layout = await self._compile(name, source, dict(key[1]), sorted(entries))
            k = self._kernels[key] = Kernel(name, key[1], iface, pipeline, layout)
        return k

    def batch(self, label: str = "") -> Batch:
        return Batch(self, label)

    # -- submission ----------------------------------------------------------------------
    def _bind_group(self, kernel: Kernel, bufs: tuple, ring: Buffer | None):
        key = (kernel, bufs, ring)  # Buffer and Kernel hash by identity
        bg = self._bind_groups.get(key)
        if bg is None:  # (binding, buffer handle, size) or, for a texture, (binding, view, None)
            entries = [(d.binding, b.view, None) if d.is_texture else (d.binding, b.handle, b.size)
                       for d, b in zip(kernel.interface.storage, bufs)]
            if ring is not None:
                entries.append((kernel.interface.uniform.binding, ring.handle, UNIFORM_SLOT))
            bg = self._bind_groups[key] = self._create_bind_group(kernel.layout, entries)
        return bg

    def _submit_batch(self, batch: Batch) -> list[Buffer]:
        batch._done = True
        n_uniform = sum(1 for d in batch._dispatches if d[2] is not None)
        ring = None
        if n_uniform:
            need = n_uniform * UNIFORM_SLOT
            if self._ring is None or self._ring.size < need:
                size = max(need, 2 * self._ring.size if self._ring else 64 * UNIFORM_SLOT)
                if self._ring is not None:
                    self.destroy_buffer(self._ring)
                self._ring = self.create_buffer(size, "uniform-ring", UNIFORM | COPY_DST)
            ring = self._ring
            packed = bytearray(n_uniform * UNIFORM_SLOT)
        commands, slot = [], 0
        for kernel, bufs, ubytes, grid in batch._dispatches:
            if ubytes is None:
                commands.append((kernel.pipeline, self._bind_group(kernel, bufs, None), None, grid))
            else:
                packed[slot * UNIFORM_SLOT: slot * UNIFORM_SLOT + len(ubytes)] = ubytes
                commands.append((kernel.pipeline, self._bind_group(kernel, bufs, ring), slot * UNIFORM_SLOT, grid))
                slot += 1
        if ring is not None:
            self._write_buffer(ring.handle, 0, memoryview(packed))
        staging, copies = [], []
        for buf, off, nbytes in batch._reads:
            st = self._take_staging(nbytes)
            staging.append(st)
            copies.append((buf.handle, off, st.handle, nbytes))
        self._submit(commands, copies, batch.label)
        return staging

    def _take_staging(self, nbytes: int) -> Buffer:
        for i, st in enumerate(self._staging_free):
            if st.size >= nbytes:
                return self._staging_free.pop(i)
        return Buffer(self._create_buffer(max(256, align4(nbytes)), MAP_READ | COPY_DST, "staging"), max(256, align4(nbytes)), "staging")

    # -- backend primitives ----------------------------------------------------------------
    def _create_buffer(self, size: int, usage: int, label: str):  # backend
        raise NotImplementedError

    def _write_buffer(self, handle, offset: int, data: memoryview) -> None:  # backend
        raise NotImplementedError

    def _destroy_buffer(self, handle) -> None:  # backend
        raise NotImplementedError

    def _create_texture(self, width: int, height: int, format: str, usage: int, label: str):  # backend
        """-> (GPUTexture, its default GPUTextureView)."""
        raise NotImplementedError

    def _destroy_texture(self, handle) -> None:  # backend
        raise NotImplementedError

    async def _compile(self, name: str, source: str, constants: dict, entries: list):  # backend
        """entries: (binding, BindingDecl kind) -> (pipeline, bind group layout); raises KernelCompileError."""
        raise NotImplementedError

    def _create_bind_group(self, layout, entries: list):  # backend; (binding, handle, size | None: a view)
        raise NotImplementedError

    def _submit(self, commands: list, copies: list, label: str) -> None:  # backend
        """commands: (pipeline, bind group, dynamic offset | None, grid) in one pass; then copies."""
        raise NotImplementedError

    async def _map_read(self, handle, nbytes: int) -> bytes:  # backend
        raise NotImplementedError

    async def wait(self) -> None:  # backend
        """Return when all submitted work has finished (for timing)."""
        raise NotImplementedError

    def destroy(self) -> None:  # backend
        raise NotImplementedError
