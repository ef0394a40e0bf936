"""Browser backend: the JS WebGPU API from Pyodide. Mirror of native.py, method for method.

Only this module (and kernels.load_wgsl) touches `js`. JS objects arrive as proxies with
camelCase methods; dicts go out through to_js(..., dict_converter=Object.fromEntries);
promises are awaited. Shader and pipeline creation run inside an error scope
(pushErrorScope('validation') / popErrorScope) so a WGSL error becomes KernelCompileError
with the compiler's messages instead of a console warning and a dead pipeline.
It cannot run natively; test it in the browser.
"""

from __future__ import annotations

from .device import LIMIT_NAMES, REQUESTED_LIMITS, WANTED_FEATURES, Device
from .errors import GPUError, KernelCompileError, NoGPUError

_NO_GPU_HELP = (
    "this browser offers no WebGPU adapter. Use a recent Chrome/Edge (WebGPU on by default) or "
    "Firefox/Safari with WebGPU enabled, serve the page from https:// or http://localhost (WebGPU "
    "needs a secure context), and check chrome://gpu; headless Chromium needs --enable-unsafe-webgpu."
)

_COMPUTE = 0x4  # GPUShaderStage.COMPUTE


def _js(obj):
    import js
    from pyodide.ffi import to_js

    return to_js(obj, dict_converter=js.Object.fromEntries)


async def open_browser_device(power_preference: str = "high-performance") -> "BrowserDevice":
    import js

    gpu = getattr(js.navigator, "gpu", None)
    if gpu is None:
        raise NoGPUError(_NO_GPU_HELP)
    adapter = await gpu.requestAdapter(_js({"powerPreference": power_preference}))
    if adapter is None:
        raise NoGPUError(_NO_GPU_HELP)
    required = {}
    for name in REQUESTED_LIMITS:
        value = getattr(adapter.limits, name, None)
        if value is not None:
            required[name] = int(value)
    try:
        features = [f for f in WANTED_FEATURES if adapter.features.has(f)]
        device = await adapter.requestDevice(_js({"requiredFeatures": features, "requiredLimits": required,
                                                  "label": "tabmesh"}))
    except Exception as e:  # JsException from a rejected promise
        raise GPUError(f"requesting a WebGPU device failed: {e}") from e
    return BrowserDevice(adapter, device)


class BrowserDevice(Device):
    backend = "browser"

    def __init__(self, adapter, device):
        import js
        from pyodide.ffi import create_proxy

        self._jsmod = js
        self.adapter = adapter
        self.device = device
        self.queue = device.queue
        self.errors: list[str] = []  # uncaptured errors (outside our error scopes), newest last

        def on_error(event):
            msg = str(event.error.message)
            self.errors.append(msg)
            js.console.error("WebGPU: " + msg)

        self._on_error = create_proxy(on_error)  # kept so it is not garbage collected
        device.addEventListener("uncapturederror", self._on_error)
        limits = {}
        for name in LIMIT_NAMES:
            value = getattr(device.limits, name, None)
            if value is not None:
                limits[name] = int(value)
        ai = getattr(adapter, "info", None)
        info = {
            "backend": self.backend,
            "vendor": str(getattr(ai, "vendor", "") or ""),
            "architecture": str(getattr(ai, "architecture", "") or ""),
            "device": str(getattr(ai, "device", "") or ""),
            "description": str(getattr(ai, "description", "") or ""),
            "features": sorted(str(f) for f in device.features),
            "limits": limits,
            "cpu_adapter": bool(getattr(ai, "isFallbackAdapter", False))
            or str(getattr(ai, "architecture", "")) == "swiftshader",
        }
        super().__init__(info)

    def _create_buffer(self, size, usage, label):
        return self.device.createBuffer(_js({"size": size, "usage": usage, "label": label}))

    def _write_buffer(self, handle, offset, data):
        # getBuffer() exposes the Python bytes to JS without a copy; writeBuffer copies them.
        from pyodide.ffi import create_proxy

        proxy = create_proxy(data)
        view = proxy.getBuffer("u8")
        try:
            self.queue.writeBuffer(handle, offset, view.data)
        finally:
            view.release()
            proxy.destroy()

    def _destroy_buffer(self, handle):
        handle.destroy()

    def _create_texture(self, width, height, format, usage, label):
        tex = self.device.createTexture(_js({"label": label, "size": [width, height, 1], "format": format,
                                             "usage": usage}))
        return tex, tex.createView()

    def _destroy_texture(self, handle):
        handle.destroy()

    @staticmethod
    def _layout_entry(binding, kind):
        entry = {"binding": binding, "visibility": _COMPUTE}
        if kind.startswith("storage-texture-"):
            entry["storageTexture"] = {"access": "write-only", "format": kind[len("storage-texture-"):],
                                       "viewDimension": "2d"}
        elif kind.startswith("texture-"):
            sample = {"float": "unfilterable-float", "uint": "uint", "sint": "sint"}[kind[len("texture-"):]]
            entry["texture"] = {"sampleType": sample, "viewDimension": "2d"}
        else:
            entry["buffer"] = {"type": kind, "hasDynamicOffset": kind == "uniform"}
        return entry

    async def _compile(self, name, source, constants, entries):
        device = self.device
        device.pushErrorScope("validation")
        module = device.createShaderModule(_js({"code": source, "label": name}))
        info = await module.getCompilationInfo()
        messages = [(str(m.type), f"{m.lineNum}:{m.linePos} {m.type}: {m.message}") for m in info.messages]
        layout = device.createBindGroupLayout(_js({"label": name, "entries": [
            self._layout_entry(b, kind) for b, kind in entries]}))
        playout = device.createPipelineLayout(_js({"label": name, "bindGroupLayouts": [layout]}))
        pipeline = device.createComputePipeline(_js({
            "label": name, "layout": playout,
            "compute": {"module": module, "entryPoint": "main", "constants": constants}}))
        error = await device.popErrorScope()
        if error is not None or any(kind == "error" for kind, _ in messages):
            detail = "\n".join([text for _, text in messages] + ([str(error.message)] if error is not None else []))
            raise KernelCompileError(name, detail)
        return pipeline, layout

    def _create_bind_group(self, layout, entries):
        return self.device.createBindGroup(_js({"layout": layout, "entries": [
            {"binding": b, "resource": h if size is None else {"buffer": h, "offset": 0, "size": size}}
            for b, h, size in entries]}))

    def _submit(self, commands, copies, label):
        js = self._jsmod
        try:
            enc = self.device.createCommandEncoder(_js({"label": label}))
            if commands:
                cpass = enc.beginComputePass(_js({"label": label}))
                # One typed array holds every dynamic offset; setBindGroup reads a slice of it.
                offsets = js.Uint32Array.new(_js([c[2] or 0 for c in commands]))
                last = None
                for i, (pipeline, bind_group, dyn_offset, (x, y, z)) in enumerate(commands):
                    if pipeline is not last:  # consecutive dispatches of one kernel keep it
                        cpass.setPipeline(pipeline)
                        last = pipeline
                    if dyn_offset is None:
                        cpass.setBindGroup(0, bind_group)
                    else:
                        cpass.setBindGroup(0, bind_group, offsets, i, 1)
                    cpass.dispatchWorkgroups(x, y, z)
                cpass.end()
            for src, src_off, dst, nbytes in copies:
                enc.copyBufferToBuffer(src, src_off, dst, 0, nbytes)
            self.queue.submit(_js([enc.finish()]))
        except Exception as e:  # JsException
            raise GPUError(f"submitting batch {label!r} failed: {e}") from e

    async def _map_read(self, handle, nbytes):
        js = self._jsmod
        await handle.mapAsync(js.GPUMapMode.READ, 0, nbytes)
        try:
            return js.Uint8Array.new(handle.getMappedRange(0, nbytes)).to_bytes()
        finally:
            handle.unmap()

    async def wait(self) -> None:
        """Resolve when all submitted work is done (for timing)."""
        await self.queue.onSubmittedWorkDone()

    def destroy(self):
        self.device.destroy()
