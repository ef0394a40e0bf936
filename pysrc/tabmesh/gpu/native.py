"""Native backend: wgpu-py (Vulkan/Metal/D3D12). Mirror of browser.py, method for method.

wgpu-py raises GPUValidationError at the failing call itself (it has no error scopes of its
own), so compile errors are caught around shader/pipeline creation and turned into
KernelCompileError. Its calls are synchronous; the async methods keep the interface of
the browser backend, where the same steps are promises.
"""

from __future__ import annotations

from .device import LIMIT_NAMES, REQUESTED_LIMITS, WANTED_FEATURES, Device
from .errors import GPUError, KernelCompileError, NoGPUError

_NO_GPU_HELP = (
    "no WebGPU adapter found by native wgpu. Install a Vulkan driver: on Debian/Ubuntu "
    "`apt-get install -y mesa-vulkan-drivers libvulkan1` (lavapipe, CPU) or the GPU vendor's driver; "
    "for NVIDIA in a container point VK_DRIVER_FILES at nvidia_icd.json."
)


def _norm(name: str) -> str:
    return name.replace("-", "").replace("_", "").lower()


def _kebab_limits(names) -> dict:
    return {_norm(n): n for n in names}


async def open_native_device(power_preference: str = "high-performance") -> "NativeDevice":
    try:
        import wgpu
    except ImportError as e:
        raise NoGPUError("the native backend needs the `wgpu` package: pip install wgpu") from e
    try:
        adapter = wgpu.gpu.request_adapter_sync(power_preference=power_preference)
    except Exception as e:  # wgpu-py raises when no backend/driver is usable
        raise NoGPUError(f"{_NO_GPU_HELP} ({type(e).__name__}: {e})") from e
    if adapter is None:
        raise NoGPUError(_NO_GPU_HELP)
    by_norm = _kebab_limits(adapter.limits)
    wanted = {by_norm[_norm(n)]: adapter.limits[by_norm[_norm(n)]] for n in REQUESTED_LIMITS if _norm(n) in by_norm}
    try:
        features = [f for f in WANTED_FEATURES if f in adapter.features]
        device = adapter.request_device_sync(required_features=features, required_limits=wanted, label="tabmesh")
    except Exception as e:
        raise GPUError(f"requesting a device from {adapter.info.get('device')!r} failed: {e}") from e
    return NativeDevice(adapter, device)


class NativeDevice(Device):
    backend = "native"

    def __init__(self, adapter, device):
        import wgpu

        self._wgpu = wgpu
        self.adapter = adapter
        self.device = device
        self.queue = device.queue
        dl = _kebab_limits(device.limits)
        limits = {n: int(device.limits[dl[_norm(n)]]) for n in LIMIT_NAMES if _norm(n) in dl}
        ai = adapter.info
        info = {
            "backend": self.backend,
            "vendor": str(ai.get("vendor", "")),
            "architecture": str(ai.get("architecture", "")),
            "device": str(ai.get("device", "")),
            "description": str(ai.get("description", "")),
            "features": sorted(str(f) for f in device.features),
            "limits": limits,
            "cpu_adapter": str(ai.get("adapter_type", "")).lower() == "cpu",  # lavapipe, SwiftShader, WARP
        }
        super().__init__(info)

    def _create_buffer(self, size, usage, label):
        return self.device.create_buffer(size=size, usage=usage, label=label)

    def _write_buffer(self, handle, offset, data):
        self.queue.write_buffer(handle, offset, data)

    def _destroy_buffer(self, handle):
        handle.destroy()

    def _create_texture(self, width, height, format, usage, label):
        tex = self.device.create_texture(label=label, size=(width, height, 1), format=format, usage=usage)
        return tex, tex.create_view()

    def _destroy_texture(self, handle):
        handle.destroy()

    @staticmethod
    def _layout_entry(binding, kind, compute):
        entry = {"binding": binding, "visibility": compute}
        if kind.startswith("storage-texture-"):
            entry["storage_texture"] = {"access": "write-only", "format": kind[len("storage-texture-"):],
                                        "view_dimension": "2d"}
        elif kind.startswith("texture-"):
            sample = {"float": "unfilterable-float", "uint": "uint", "sint": "sint"}[kind[len("texture-"):]]
            entry["texture"] = {"sample_type": sample, "view_dimension": "2d"}
        else:
            entry["buffer"] = {"type": kind, "has_dynamic_offset": kind == "uniform"}
        return entry

    async def _compile(self, name, source, constants, entries):
        wgpu = self._wgpu
        try:
            module = self.device.create_shader_module(code=source, label=name)
            layout = self.device.create_bind_group_layout(label=name, entries=[
                self._layout_entry(b, kind, wgpu.ShaderStage.COMPUTE) for b, kind in entries])
            playout = self.device.create_pipeline_layout(label=name, bind_group_layouts=[layout])
            pipeline = self.device.create_compute_pipeline(
                label=name, layout=playout, compute={"module": module, "entry_point": "main", "constants": constants})
        except wgpu.GPUError as e:
            raise KernelCompileError(name, str(e)) from None
        return pipeline, layout

    def _create_bind_group(self, layout, entries):
        return self.device.create_bind_group(layout=layout, entries=[
            {"binding": b, "resource": h if size is None else {"buffer": h, "offset": 0, "size": size}}
            for b, h, size in entries])

    def _submit(self, commands, copies, label):
        wgpu = self._wgpu
        try:
            enc = self.device.create_command_encoder(label=label)
            if commands:
                cpass = enc.begin_compute_pass(label=label)
                last = None
                for pipeline, bind_group, dyn_offset, (x, y, z) in commands:
                    if pipeline is not last:  # consecutive dispatches of one kernel keep it
                        cpass.set_pipeline(pipeline)
                        last = pipeline
                    if dyn_offset is None:
                        cpass.set_bind_group(0, bind_group)
                    else:
                        cpass.set_bind_group(0, bind_group, [dyn_offset])
                    cpass.dispatch_workgroups(x, y, z)
                cpass.end()
            for src, src_off, dst, nbytes in copies:
                enc.copy_buffer_to_buffer(src, src_off, dst, 0, nbytes)
            self.queue.submit([enc.finish()])
        except wgpu.GPUError as e:
            raise GPUError(f"submitting batch {label!r} failed: {e}") from None

    async def _map_read(self, handle, nbytes):
        handle.map_sync(self._wgpu.MapMode.READ, 0, nbytes)
        try:
            return bytes(handle.read_mapped(0, nbytes))
        finally:
            handle.unmap()

    async def wait(self) -> None:
        """Block until all submitted work is done (for timing).

        wgpu-py 0.32's on_submitted_work_done_sync fails (a cffi callback signature mismatch),
        so read back 4 bytes instead: the copy runs after all earlier submits.
        """
        if getattr(self, "_fence", None) is None:
            self._fence = self.create_buffer(4, "fence")
        await self.read(self._fence, 0, 4)

    def destroy(self):
        self.device.destroy()
