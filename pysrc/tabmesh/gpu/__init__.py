"""WebGPU layer: one device interface, two backends (browser JS API under Pyodide, native wgpu-py).

    from tabmesh.gpu import open_device
    dev = await open_device()
    k = await dev.kernel("rmsnorm", WG=256)       # wgsl/rmsnorm.wgsl, cached per constants
    b = dev.batch(); b.dispatch(k, (n_tokens,), x=..., w=..., out=..., n=576, eps=1e-5); b.submit()

The same WGSL and the same Python calling code (ops.py) run on both backends.
"""

from __future__ import annotations

from .device import Batch, Buffer, Device, Kernel, Texture
from .errors import GPUError, KernelCompileError, NoGPUError
from .kernels import IN_PYODIDE, load_wgsl

__all__ = ["open_device", "Device", "Buffer", "Batch", "Kernel", "Texture", "GPUError", "NoGPUError",
           "KernelCompileError", "load_wgsl", "IN_PYODIDE"]


async def open_device(backend: str = "auto", power_preference: str = "high-performance") -> Device:
    """A WebGPU device: 'browser' under Pyodide, 'native' (wgpu-py) elsewhere, or as named.

    Raises NoGPUError with what to do when no adapter is available.
    """
    if backend == "auto":
        backend = "browser" if IN_PYODIDE else "native"
    if backend == "browser":
        from .browser import open_browser_device

        return await open_browser_device(power_preference)
    if backend == "native":
        from .native import open_native_device

        return await open_native_device(power_preference)
    raise ValueError(f"unknown GPU backend {backend!r}: use 'auto', 'browser' or 'native'")
