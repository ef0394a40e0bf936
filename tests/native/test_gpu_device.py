"""The device layer itself: open, info, buffers, batches, compile errors, self-test."""

import json

import numpy as np
import pytest

from tabmesh.gpu import KernelCompileError
from tabmesh.gpu.kernels import parse_interface
from tabmesh.gpu.selftest import run_selftest


def test_info_is_json(gpu):
    info = json.loads(json.dumps(gpu.info))
    assert {"vendor", "architecture", "device", "description", "features", "limits"} <= set(info)
    assert info["features"] == sorted(info["features"])
    assert info["limits"]["maxComputeWorkgroupsPerDimension"] >= 65535
    assert isinstance(info["cpu_adapter"], bool)


def test_selftest(gpu, arun):
    r = arun(run_selftest(gpu, m=64, n=48, k=80, seed=1234))
    assert r["ok"], r["max_abs_err"]
    assert r["kernel"] == "matmul_f32"
    assert len(r["a"]) == 64 * 80 and len(r["b"]) == 80 * 48 and len(r["c"]) == 64 * 48
    json.dumps(r)


def test_selftest_ragged_shape(gpu, arun):
    r = arun(run_selftest(gpu, m=17, n=5, k=33, seed=7))
    assert r["ok"], r["max_abs_err"]


def test_upload_read_roundtrip(gpu, arun):
    data = np.arange(1001, dtype=np.uint8).tobytes()  # not a multiple of 4: padded
    buf = gpu.upload(data, "roundtrip")
    assert buf.size == 1004
    assert arun(gpu.read(buf, 0, 1000)) == data[:1000]
    assert arun(gpu.read(buf, 400, 8)) == data[400:408]
    gpu.destroy_buffer(buf)


def test_compile_error_is_kernel_compile_error(gpu, arun, monkeypatch):
    from tabmesh.gpu import kernels

    monkeypatch.setitem(kernels._source_cache, "broken_test_kernel", "fn main( { }")
    with pytest.raises(KernelCompileError) as e:
        arun(gpu.kernel("broken_test_kernel"))
    assert "broken_test_kernel" in str(e.value) and "expected" in e.value.message


def test_uniform_fields_checked(gpu, arun):
    k = arun(gpu.kernel("matmul_f32"))
    buf = gpu.create_buffer(64)
    with pytest.raises(TypeError, match="missing"):
        gpu.batch().dispatch(k, (1, 1), a=buf, b=buf, c=gpu.create_buffer(64), m=1, n=1)
    with pytest.raises(ValueError, match="aliasing"):
        gpu.batch().dispatch(k, (1, 1), a=buf, b=buf, c=buf, m=1, n=1, k=1)


def test_parse_interface():
    src = """
    struct P { n: u32, eps: f32 }  // shapes
    @group(0) @binding(0) var<uniform> p: P;
    @group(0) @binding(2) var<storage, read_write> y: array<f32>;
    @group(0) @binding(1) var<storage, read> x: array<vec4<f32>>;
    """
    i = parse_interface("t", src)
    assert [(d.name, d.kind) for d in i.storage] == [("x", "read-only-storage"), ("y", "storage")]
    assert i.fields == (("n", "u32"), ("eps", "f32"))
    assert i.pack("t", {"n": 3, "eps": 0.5}) == b"\x03\0\0\0\0\0\0\x3f"
