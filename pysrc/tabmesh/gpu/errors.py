"""GPU error types. Messages say what to do next.

The lead will fold these into tabmesh/errors.py; until then they live here so the gpu
package imports on its own.
"""


class GPUError(RuntimeError):
    """A WebGPU call failed (validation, out of memory, device lost)."""


class NoGPUError(GPUError):
    """No WebGPU adapter could be obtained."""


class KernelCompileError(GPUError):
    """A WGSL kernel failed to compile or its pipeline failed validation."""

    def __init__(self, kernel: str, message: str):
        self.kernel = kernel
        self.message = message
        super().__init__(f"WGSL kernel {kernel!r} failed to compile:\n{message}")
