"""Static side of the server: MIME types, caching, ranges, traversal, wheels, the source zip."""

import asyncio
import contextlib
import hashlib
import io
import json
import logging
import os
import zipfile

import aiohttp
import pytest

from signaling.server import DEFAULT_CSP, ServerConfig, start
from signaling.static import safe_join, verify_wheels, verify_wheels_fallback

MODEL = bytes(range(256)) * 4  # 1024 bytes


@pytest.fixture
def root(tmp_path):
    """A server root with every kind of file, plus a secret outside it and links to it."""
    r = tmp_path / "root"
    files = {
        "web/index.html": "<!doctype html><title>t</title>",
        "web/app.js": "export const x = 1;",
        "web/boot.mjs": "import './app.js';",
        "web/style.css": "body{}",
        "web/sub/data.json": '{"a": 1}',
        "web/.hidden": "hidden",
        "wgsl/rmsnorm.wgsl": "@compute @workgroup_size(1) fn main() {}",
        "vendor/pyodide/pyodide.asm.wasm": b"\0asm\1\0\0\0",
        "vendor/pyodide/pyodide.mjs": "export {};",
        "vendor/pyodide/python_stdlib.zip": b"PK\5\6" + b"\0" * 18,
        "vendor/pyodide/good-1.0-py3-none-any.whl": b"good wheel",
        "vendor/pyodide/bad-1.0-py3-none-any.whl": b"tampered wheel",
        "vendor/pyodide/stray-1.0-py3-none-any.whl": b"not in the lock",
        "pysrc/tabmesh/__init__.py": "__version__ = 'x'\n",
        "pysrc/tabmesh/cli.py": "# host only\n",
        "pysrc/tabmesh/setup_assets.py": "# host only\n",
        "pysrc/tabmesh/headless.py": "# host only\n",
        "pysrc/tabmesh/bench.py": "# host only\n",
        "pysrc/tabmesh/host/__init__.py": "# host only\n",
        "pysrc/tabmesh/mesh/__init__.py": "",
        "pysrc/tabmesh/mesh/frames.py": "FRAME = 1\n",
        "pysrc/tabmesh/mesh/notes.txt": "not python\n",
        "models/tiny.gguf": MODEL,
        "models/all-MiniLM-L6-v2/model.safetensors": b"\0" * 64,
        "models/all-MiniLM-L6-v2/tokenizer.json": "{}",
        "secret.txt": "outside web/",
    }
    for rel, content in files.items():
        path = r / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content if isinstance(content, bytes) else content.encode())
    lock = {"packages": {
        "good": {"file_name": "good-1.0-py3-none-any.whl",
                 "sha256": hashlib.sha256(b"good wheel").hexdigest()},
        "bad": {"file_name": "bad-1.0-py3-none-any.whl",
                "sha256": hashlib.sha256(b"the official wheel").hexdigest()},
    }}
    (r / "vendor/pyodide/pyodide-lock.json").write_text(json.dumps(lock))
    (tmp_path / "outside.txt").write_text("TOP SECRET")
    (r / "web/leak.txt").symlink_to(tmp_path / "outside.txt")
    (r / "web/leakdir").symlink_to(tmp_path)
    (r / "web/alias.js").symlink_to(r / "web/app.js")
    (r / "models/escape.gguf").symlink_to(tmp_path / "outside.txt")
    return r


@contextlib.asynccontextmanager
async def serving(root):
    runner, _, port = await start(ServerConfig(root=root, port=0))
    try:
        async with aiohttp.ClientSession() as session:
            yield f"http://127.0.0.1:{port}", session, port
    finally:
        await runner.cleanup()


def run(coro, timeout=5.0):
    return asyncio.run(asyncio.wait_for(coro, timeout))


async def raw_status(port, target):
    """Send the request target byte for byte (clients normalise `..`; attackers do not)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(f"GET {target} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n\r\n".encode())
    await writer.drain()
    head = await reader.read(-1)
    writer.close()
    status = int(head.split(b" ", 2)[1])
    return status, head


MIME_CASES = [
    ("/", "text/html"), ("/index.html", "text/html"), ("/app.js", "text/javascript"),
    ("/boot.mjs", "text/javascript"), ("/style.css", "text/css"), ("/sub/data.json", "application/json"),
    ("/wgsl/rmsnorm.wgsl", "text/plain; charset=utf-8"),
    ("/vendor/pyodide/pyodide.asm.wasm", "application/wasm"),
    ("/vendor/pyodide/pyodide.mjs", "text/javascript"),
    ("/vendor/pyodide/python_stdlib.zip", "application/zip"),
    ("/vendor/pyodide/pyodide-lock.json", "application/json"),
    ("/vendor/pyodide/good-1.0-py3-none-any.whl", "application/zip"),
    ("/py/tabmesh.zip", "application/zip"),
    ("/models/tiny.gguf", "application/octet-stream"),
    ("/models/", "application/json"), ("/healthz", "application/json"),
]


def test_mime_types_cache_control_and_security_headers(root):
    async def go():
        async with serving(root) as (base, s, _):
            for path, mime in MIME_CASES:
                async with s.get(base + path) as r:
                    assert r.status == 200, path
                    assert r.headers["Content-Type"].startswith(mime), (path, r.headers["Content-Type"])
                    assert r.headers["Content-Security-Policy"] == DEFAULT_CSP
                    assert r.headers["X-Content-Type-Options"] == "nosniff"
                    assert r.headers["Referrer-Policy"] == "no-referrer"
                    want = "public, max-age=31536000, immutable" if path.startswith("/vendor/") else "no-cache"
                    assert r.headers["Cache-Control"] == want, path
            async with s.get(base + "/missing.js") as r:
                assert r.status == 404 and r.headers["X-Content-Type-Options"] == "nosniff"
    run(go())


def test_etag_revalidation_gives_304(root):
    async def go():
        async with serving(root) as (base, s, _):
            for path in ("/app.js", "/vendor/pyodide/pyodide.mjs", "/models/tiny.gguf", "/py/tabmesh.zip"):
                async with s.get(base + path) as r:
                    etag = r.headers["ETag"]
                async with s.get(base + path, headers={"If-None-Match": etag}) as r:
                    assert r.status == 304, path
                    assert await r.read() == b""
                async with s.get(base + path, headers={"If-None-Match": '"other"'}) as r:
                    assert r.status == 200, path
    run(go())


RANGES = [
    ("bytes=0-9", 206, "bytes 0-9/1024", MODEL[:10]),
    ("bytes=1000-", 206, "bytes 1000-1023/1024", MODEL[1000:]),
    ("bytes=-5", 206, "bytes 1019-1023/1024", MODEL[-5:]),
    ("bytes=1000-5000", 206, "bytes 1000-1023/1024", MODEL[1000:]),
    ("bytes=1024-", 416, "bytes */1024", None),
    ("bytes=9-3", 416, "bytes */1024", None),
    ("bytes=abc", 416, "bytes */1024", None),
    ("bytes=0-1,4-5", 416, "bytes */1024", None),  # single ranges only
]


def test_model_ranges(root):
    async def go():
        async with serving(root) as (base, s, _):
            async with s.get(base + "/models/tiny.gguf") as r:
                assert r.status == 200 and r.headers["Accept-Ranges"] == "bytes"
                assert await r.read() == MODEL
            async with s.head(base + "/models/tiny.gguf") as r:
                assert r.status == 200 and r.headers["Content-Length"] == "1024"
            for header, status, content_range, body in RANGES:
                async with s.get(base + "/models/tiny.gguf", headers={"Range": header}) as r:
                    assert r.status == status, header
                    assert r.headers["Content-Range"] == content_range, header
                    if body is not None:
                        assert await r.read() == body, header
            async with s.get(base + "/models/all-MiniLM-L6-v2/tokenizer.json",
                             headers={"Range": "bytes=0-0"}) as r:
                assert r.status == 206 and await r.read() == b"{"
    run(go())


def test_models_index(root):
    async def go():
        async with serving(root) as (base, s, _):
            async with s.get(base + "/models/") as r:
                return await r.json()
    models = run(go())["models"]
    assert models == [
        {"name": "all-MiniLM-L6-v2", "kind": "embedding", "size": 66,
         "files": [{"name": "model.safetensors", "size": 64}, {"name": "tokenizer.json", "size": 2}]},
        {"name": "tiny.gguf", "size": 1024, "kind": "gguf"},  # escape.gguf (symlink out) is left out
    ]


TRAVERSALS = [
    "/../secret.txt", "/%2e%2e/secret.txt", "/%2E%2E/secret.txt", "/..%2fsecret.txt",
    "/sub/../../secret.txt", "/sub/%2e%2e/%2e%2e/secret.txt", "/vendor/../secret.txt",
    "/vendor/%2e%2e/secret.txt", "/vendor/pyodide/%2e%2e/%2e%2e/secret.txt",
    "/models/%2e%2e/secret.txt", "/models/..%2fsecret.txt", "/wgsl/..%2f..%2fsecret.txt",
    "/wgsl/%2e%2e%2fweb%2findex.html", "//etc/passwd", "/%2fetc%2fpasswd", "/vendor//etc/passwd",
    "/models//etc/passwd", "/..%5csecret.txt", "/%5c..%5csecret.txt", "/index.html%00",
    "/leak.txt", "/leakdir/outside.txt", "/leakdir/root/secret.txt", "/.hidden", "/%2ehidden",
    "/models/escape.gguf", "/py/../secret.txt",
]


def test_path_traversal_is_impossible(root):
    async def go():
        async with serving(root) as (base, s, port):
            for target in TRAVERSALS:
                status, raw = await raw_status(port, target)
                assert status == 404, (target, raw[:200])
                assert b"TOP SECRET" not in raw and b"outside web/" not in raw
            async with s.get(base + "/alias.js") as r:  # a link that stays inside is fine
                assert r.status == 200
    run(go())


def test_safe_join(root):
    web = root / "web"
    assert safe_join(web, "app.js") == (web / "app.js").resolve()
    assert safe_join(web, "sub/data.json") is not None
    for rel in ("", "/etc/passwd", "../secret.txt", "sub/../app.js", "sub", ".hidden", "leak.txt",
                "a\\b", "app.js\x00", "sub//data.json", "./app.js"):
        assert safe_join(web, rel) is None, rel


def test_tabmesh_zip_ships_browser_modules_only_and_rebuilds(root):
    async def fetch(s, base):
        async with s.get(base + "/py/tabmesh.zip") as r:
            return await r.read(), r.headers["ETag"]

    async def go():
        async with serving(root) as (base, s, _):
            first, etag1 = await fetch(s, base)
            frames = root / "pysrc/tabmesh/mesh/frames.py"
            frames.write_text("FRAME = 2\n")
            st = frames.stat()
            os.utime(frames, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
            second, etag2 = await fetch(s, base)
            again, etag3 = await fetch(s, base)
            return first, second, etag1, etag2, etag3, again

    first, second, etag1, etag2, etag3, again = run(go())
    names = set(zipfile.ZipFile(io.BytesIO(first)).namelist())
    assert names == {"tabmesh/__init__.py", "tabmesh/mesh/__init__.py", "tabmesh/mesh/frames.py"}
    assert etag1 != etag2 == etag3 and again == second
    assert zipfile.ZipFile(io.BytesIO(second)).read("tabmesh/mesh/frames.py") == b"FRAME = 2\n"


def test_wheels_are_served_only_if_verified(root):
    async def go():
        async with serving(root) as (base, s, _):
            async with s.get(base + "/vendor/pyodide/good-1.0-py3-none-any.whl") as r:
                assert r.status == 200 and await r.read() == b"good wheel"
            for name, why in (("bad-1.0-py3-none-any.whl", "sha256"), ("stray-1.0-py3-none-any.whl", "not listed")):
                async with s.get(base + "/vendor/pyodide/" + name) as r:
                    text = await r.text()
                    assert r.status == 409, name
                    assert name in text and why in text, text
                    assert r.headers["X-Content-Type-Options"] == "nosniff"
            # a wheel that appears after start-up was never checked
            (root / "vendor/pyodide/late-1.0-py3-none-any.whl").write_bytes(b"late")
            async with s.get(base + "/vendor/pyodide/late-1.0-py3-none-any.whl") as r:
                assert r.status == 409 and "start-up" in await r.text()
    run(go())


@pytest.mark.parametrize("verify", [verify_wheels, verify_wheels_fallback])
def test_wheel_verifiers_agree(root, verify):
    verdicts = verify(root / "vendor/pyodide")
    assert verdicts["good-1.0-py3-none-any.whl"] is None
    assert "sha256" in verdicts["bad-1.0-py3-none-any.whl"] or "match" in verdicts["bad-1.0-py3-none-any.whl"]
    assert verdicts["stray-1.0-py3-none-any.whl"] is not None
    (root / "vendor/pyodide/pyodide-lock.json").write_text("{broken")
    assert all(v is not None for v in verify(root / "vendor/pyodide").values())


def test_healthz_and_request_log(root, caplog):
    async def go():
        async with serving(root) as (base, s, _):
            async with s.get(base + "/healthz") as r:
                return await r.json()

    with caplog.at_level(logging.INFO, logger="signaling"):
        health = run(go())
    assert health["ok"] is True and health["rooms"] == 0 and health["peers"] == 0
    assert isinstance(health["version"], str) and health["uptime_s"] >= 0
    assert any(rec.getMessage() == "GET /healthz 200" for rec in caplog.records)
