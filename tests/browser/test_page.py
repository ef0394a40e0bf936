"""The page boots in real headless Chromium: Pyodide, WebGPU (SwiftShader), signaling."""
import numpy as np


def test_page_boots_reports_adapter_and_selftest_matches_numpy(open_node, room, app):
    node = open_node(room)
    assert node.info["room"] == room
    assert len(node.info["peerId"]) == 12
    gpu = node.info["gpu"]
    assert gpu is not None, "no WebGPU adapter in headless Chromium (--enable-unsafe-webgpu)"
    assert gpu["vendor"] and gpu["architecture"]
    assert gpu["limits"]["maxStorageBufferBindingSize"] > 0
    assert isinstance(gpu["features"], list)

    r = node.page.evaluate("tabmesh.selfTest()")
    m, n, k = r["m"], r["n"], r["k"]
    a = np.array(r["a"], dtype=np.float32).reshape(m, k)
    b = np.array(r["b"], dtype=np.float32).reshape(k, n)
    c = np.array(r["c"], dtype=np.float32).reshape(m, n)
    assert a.std() > 0.1 and b.std() > 0.1, "self-test inputs must be random, not constant"
    ref = a.astype(np.float64) @ b.astype(np.float64)
    # f32 accumulation of k products of values in [-1, 1]: error ~ k * eps * |row|·|col|.
    tol = k * np.finfo(np.float32).eps * (np.abs(a) @ np.abs(b))
    assert np.all(np.abs(c - ref) <= tol + 1e-6), float(np.max(np.abs(c - ref)))
    assert r["ok"] is True

    # The page shows what the API reports, as text.
    assert node.page.inner_text("#peer-id") == node.peer_id
    assert "ok" in node.page.inner_text("#selftest")
    assert node.page.evaluate("tabmesh.errors") == []
    assert node.peers() == []


def test_every_request_goes_to_the_own_origin(open_node, room, app):
    node = open_node(room)
    node.page.evaluate("tabmesh.selfTest()")
    assert node.requests, "no requests recorded"
    foreign = [u for u in node.requests if not (u.startswith(app.origin + "/") or u.startswith(("data:", "blob:")))]
    assert foreign == [], foreign
    # and the pieces that must come from our server did
    paths = {u[len(app.origin):].split("?")[0] for u in node.requests}
    for needed in ("/vendor/pyodide/pyodide.mjs", "/py/tabmesh.zip", "/wgsl/matmul_f32.wgsl"):
        assert any(p.startswith(needed) for p in paths), (needed, sorted(paths))
