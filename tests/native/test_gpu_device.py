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


def test_parse_interface_textures():
    src = """
    @group(0) @binding(0) var<uniform> p: P;
    struct P { n: u32 }
    @group(0) @binding(3) var out: texture_storage_2d<rgba32float, write>;
    @group(0) @binding(1) var qt: texture_2d<u32>;
    @group(0) @binding(2) var xt : texture_2d< f32 >;
    """
    i = parse_interface("t", src)
    assert [(d.name, d.kind) for d in i.storage] == [("qt", "texture-uint"), ("xt", "texture-float"),
                                                     ("out", "storage-texture-rgba32float")]
    assert [d.is_texture for d in i.storage] == [True, True, True]
    assert [d.writable for d in i.storage] == [False, False, True]


TEXTURE_ROUNDTRIP = """
@group(0) @binding(0) var<storage, read> src: array<u32>;
@group(0) @binding(1) var tw: texture_storage_2d<rgba32uint, write>;
@compute @workgroup_size(1)
fn main(@builtin(global_invocation_id) g: vec3<u32>) {
  let i = 4u * (g.y * 3u + g.x);
  textureStore(tw, vec2<i32>(i32(g.x), i32(g.y)), vec4<u32>(src[i], src[i + 1u], src[i + 2u], src[i + 3u]));
}
"""

TEXTURE_READ = """
@group(0) @binding(0) var tr: texture_2d<u32>;
@group(0) @binding(1) var<storage, read_write> dst: array<u32>;
@compute @workgroup_size(1)
fn main(@builtin(global_invocation_id) g: vec3<u32>) {
  let v = textureLoad(tr, vec2<i32>(i32(g.x), i32(g.y)), 0);
  let i = 4u * (g.y * 3u + g.x);
  dst[i] = v.x; dst[i + 1u] = v.y; dst[i + 2u] = v.z; dst[i + 3u] = v.w;
}
"""


def test_texture_write_then_read(gpu, arun, monkeypatch):
    # a storage-texture write and a textureLoad of the same texture in two dispatches of one pass
    from tabmesh.gpu import Texture, kernels

    monkeypatch.setitem(kernels._source_cache, "tex_write_test", TEXTURE_ROUNDTRIP)
    monkeypatch.setitem(kernels._source_cache, "tex_read_test", TEXTURE_READ)
    kw, kr = arun(gpu.kernel("tex_write_test")), arun(gpu.kernel("tex_read_test"))
    data = (np.arange(3 * 2 * 4, dtype=np.uint64) * 2654435761 % 2**32).astype(np.uint32)
    tex = gpu.create_texture(3, 2, "rgba32uint", "roundtrip")
    assert isinstance(tex, Texture) and tex.nbytes == 96
    src, dst = gpu.upload(data.astype(np.uint32)), gpu.create_buffer(96)
    with pytest.raises(TypeError, match="texture"):
        gpu.batch().dispatch(kw, (3, 2), src=src, tw=src)
    with pytest.raises(TypeError, match="buffer"):
        gpu.batch().dispatch(kr, (3, 2), tr=tex, dst=tex)
    b = gpu.batch()
    b.dispatch(kw, (3, 2), src=src, tw=tex)
    b.dispatch(kr, (3, 2), tr=tex, dst=dst)
    b.read(dst)
    (raw,) = arun(b.run())
    np.testing.assert_array_equal(np.frombuffer(raw, np.uint32), data)
    with pytest.raises(Exception, match="maxTextureDimension2D"):
        gpu.create_texture(1, gpu.info["limits"]["maxTextureDimension2D"] + 1)
    gpu.destroy_texture(tex)
