"""Static files: the page, WGSL kernels, vendored Pyodide, the tabmesh source zip, models.

Every file goes through `safe_join`, which resolves symlinks and refuses anything that
lands outside its base folder, hidden names, and `..`. Vendored Pyodide wheels are served
only if their sha256 matched pyodide-lock.json when the server started.
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import json
import logging
import os
import re
import zipfile
from pathlib import Path

from aiohttp import web

log = logging.getLogger("signaling.static")

CONTENT_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".htm": "text/html; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".mjs": "text/javascript; charset=utf-8",
    ".json": "application/json",
    ".map": "application/json",
    ".wasm": "application/wasm",
    ".whl": "application/zip",
    ".zip": "application/zip",
    ".gguf": "application/octet-stream",
    ".safetensors": "application/octet-stream",
    ".py": "text/x-python; charset=utf-8",
    ".wgsl": "text/plain; charset=utf-8",
    ".txt": "text/plain; charset=utf-8",
    ".md": "text/markdown; charset=utf-8",
    ".svg": "image/svg+xml",
    ".png": "image/png",
    ".jpg": "image/jpeg",
    ".jpeg": "image/jpeg",
    ".gif": "image/gif",
    ".ico": "image/x-icon",
    ".webp": "image/webp",
    ".woff2": "font/woff2",
    ".tar": "application/x-tar",
}
FALLBACK_CONTENT_TYPE = "application/octet-stream"
CACHE_IMMUTABLE = "public, max-age=31536000, immutable"
CACHE_REVALIDATE = "no-cache"

# Modules that only make sense on the host; never shipped to the browser.
HOST_ONLY_MODULES = frozenset(("cli.py", "setup_assets.py", "headless.py", "bench.py"))
HOST_ONLY_PACKAGES = frozenset(("host",))
WGSL_NAME_RE = re.compile(r"[A-Za-z0-9_.-]+\.wgsl")


def content_type_for(path: Path) -> str:
    return CONTENT_TYPES.get(path.suffix.lower(), FALLBACK_CONTENT_TYPE)


def safe_join(base: Path, rel: str) -> Path | None:
    """The regular file `base/rel`, or None if it is missing or would escape `base`."""
    if not rel or "\x00" in rel or "\\" in rel or rel.startswith("/"):
        return None
    if any(part in ("", ".", "..") or part.startswith(".") for part in rel.split("/")):
        return None
    try:
        base_real = base.resolve(strict=True)
        target = (base_real / rel).resolve(strict=True)
    except (OSError, RuntimeError):
        return None
    if not target.is_relative_to(base_real) or not target.is_file():
        return None
    return target


def file_response(path: Path, *, immutable: bool = False) -> web.FileResponse:
    """FileResponse does ETag/If-None-Match, Last-Modified, HEAD and single Range (206/416)."""
    return web.FileResponse(path, headers={
        "Content-Type": content_type_for(path),
        "Cache-Control": CACHE_IMMUTABLE if immutable else CACHE_REVALIDATE,
    })


# ---- Pyodide wheel verification -----------------------------------------------------

def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def verify_wheels_fallback(pyodide_dir: Path) -> dict[str, str | None]:
    """Same contract as tabmesh.setup_assets.verify_pyodide_wheels (used if that is absent)."""
    wheels = sorted(p for p in pyodide_dir.glob("*.whl") if p.is_file())
    if not wheels:
        return {}
    lock_path = pyodide_dir / "pyodide-lock.json"
    try:
        packages = json.loads(lock_path.read_text(encoding="utf-8")).get("packages") or {}
    except (OSError, ValueError, AttributeError) as exc:
        return {w.name: f"cannot read {lock_path.name}: {exc}" for w in wheels}
    expected: dict[str, str] = {}
    for pkg in packages.values() if isinstance(packages, dict) else ():
        if isinstance(pkg, dict) and isinstance(pkg.get("file_name"), str):
            expected[pkg["file_name"].rsplit("/", 1)[-1]] = str(pkg.get("sha256", "")).lower()
    verdicts: dict[str, str | None] = {}
    for wheel in wheels:
        want = expected.get(wheel.name)
        if want is None:
            verdicts[wheel.name] = "not listed in pyodide-lock.json"
            continue
        got = _sha256_file(wheel)
        verdicts[wheel.name] = None if got == want else (
            f"sha256 {got} does not match pyodide-lock.json ({want})")
    return verdicts


def verify_wheels(pyodide_dir: Path) -> dict[str, str | None]:
    if not pyodide_dir.is_dir():
        return {}
    try:
        from tabmesh.setup_assets import verify_pyodide_wheels
    except ImportError:
        verify_pyodide_wheels = verify_wheels_fallback
    try:
        return dict(verify_pyodide_wheels(pyodide_dir))
    except Exception as exc:  # a broken verifier must not let unverified wheels through
        log.exception("wheel verification failed")
        return {p.name: f"verification failed: {exc}" for p in pyodide_dir.glob("*.whl")}


# ---- tabmesh.zip ----------------------------------------------------------------------

class SourceZip:
    """pysrc/tabmesh/**/*.py as tabmesh/... in a zip, rebuilt when a file's mtime/size changes."""

    def __init__(self, package_dir: Path):
        self.package_dir = package_dir
        self._signature: tuple | None = None
        self.data = b""
        self.etag = ""

    def sources(self) -> list[tuple[str, Path, int, int]]:
        """(zip name, path, mtime_ns, size) for every shipped module, sorted."""
        base = self.package_dir
        if not base.is_dir():
            return []
        base_real = base.resolve()
        found = []
        for dirpath, dirnames, filenames in os.walk(base):
            rel_dir = Path(dirpath).relative_to(base)
            dirnames[:] = sorted(d for d in dirnames if not d.startswith((".", "__pycache__"))
                                 and not (rel_dir == Path(".") and d in HOST_ONLY_PACKAGES))
            for name in sorted(filenames):
                if not name.endswith(".py") or name.startswith("."):
                    continue
                if rel_dir == Path(".") and name in HOST_ONLY_MODULES:
                    continue
                path = Path(dirpath) / name
                if not path.resolve().is_relative_to(base_real):
                    continue
                st = path.stat()
                found.append(((Path("tabmesh") / rel_dir / name).as_posix(), path, st.st_mtime_ns, st.st_size))
        return found

    def current(self) -> tuple[bytes, str]:
        sources = self.sources()
        signature = tuple((name, mtime, size) for name, _, mtime, size in sources)
        if signature != self._signature:
            buf = io.BytesIO()
            with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
                for name, path, _, _ in sources:
                    info = zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0))
                    info.external_attr = 0o644 << 16
                    info.compress_type = zipfile.ZIP_DEFLATED
                    zf.writestr(info, path.read_bytes())
            self.data = buf.getvalue()
            self.etag = hashlib.sha256(self.data).hexdigest()[:24]
            self._signature = signature
            log.info("built tabmesh.zip: %d modules, %d bytes", len(sources), len(self.data))
        return self.data, self.etag


# ---- models -----------------------------------------------------------------------------

def list_models(models_dir: Path, max_files: int = 1000) -> list[dict]:
    """Top-level *.gguf files and model folders (folders with weights are "embedding")."""
    models: list[dict] = []
    if not models_dir.is_dir():
        return models
    models_real = models_dir.resolve()
    for entry in sorted(models_dir.iterdir()):
        if entry.name.startswith("."):
            continue
        if entry.suffix.lower() == ".gguf":
            if (path := safe_join(models_dir, entry.name)) is not None:
                models.append({"name": entry.name, "size": path.stat().st_size, "kind": "gguf"})
            continue
        if not entry.is_dir() or not entry.resolve().is_relative_to(models_real):
            continue
        files = []
        for path in sorted(entry.rglob("*")):
            rel = path.relative_to(models_dir).as_posix()
            if len(files) >= max_files or safe_join(models_dir, rel) is None:
                continue
            files.append({"name": path.relative_to(entry).as_posix(), "size": path.stat().st_size})
        if not files:
            continue
        has_weights = any(f["name"].endswith((".safetensors", ".onnx", ".bin", ".gguf")) for f in files)
        models.append({"name": entry.name, "kind": "embedding" if has_weights else "other",
                       "size": sum(f["size"] for f in files), "files": files})
    return models


# ---- handlers -------------------------------------------------------------------------

class StaticFiles:
    def __init__(self, root: Path, models_dir: Path):
        self.root = root
        self.web_dir = root / "web"
        self.wgsl_dir = root / "wgsl"
        self.vendor_dir = root / "vendor"
        self.models_dir = models_dir
        self.source_zip = SourceZip(root / "pysrc" / "tabmesh")
        self.wheel_verdicts: dict[str, str | None] = {}

    async def verify_wheels(self) -> None:
        loop = asyncio.get_running_loop()
        pyodide_dir = self.vendor_dir / "pyodide"
        self.wheel_verdicts = await loop.run_in_executor(None, verify_wheels, pyodide_dir)
        for name, error in sorted(self.wheel_verdicts.items()):
            if error is None:
                log.info("wheel ok: %s", name)
            else:
                log.warning("wheel REFUSED: %s: %s", name, error)

    def routes(self) -> list[web.RouteDef]:
        return [
            web.get("/py/tabmesh.zip", self.tabmesh_zip),
            web.get("/models", self.models_index),
            web.get("/models/", self.models_index),
            web.get("/models/{path:.+}", self.model_file),
            web.get("/wgsl/{name}", self.wgsl),
            web.get("/vendor/{path:.+}", self.vendor),
            web.get("/", self.index),
            web.get("/{path:.+}", self.web_file),
        ]

    async def index(self, request: web.Request) -> web.StreamResponse:
        return self._serve(self.web_dir, "index.html")

    async def web_file(self, request: web.Request) -> web.StreamResponse:
        return self._serve(self.web_dir, request.match_info["path"])

    async def wgsl(self, request: web.Request) -> web.StreamResponse:
        name = request.match_info["name"]
        if not WGSL_NAME_RE.fullmatch(name):
            raise web.HTTPNotFound()
        return self._serve(self.wgsl_dir, name)

    async def vendor(self, request: web.Request) -> web.StreamResponse:
        rel = request.match_info["path"]
        path = safe_join(self.vendor_dir, rel)
        if path is None:
            raise web.HTTPNotFound()
        if rel.startswith("pyodide/") and rel.lower().endswith(".whl"):
            name = rel[len("pyodide/"):]
            if "/" in name:
                error: str | None = "wheels are only verified directly inside vendor/pyodide/"
            else:
                error = self.wheel_verdicts.get(name, "was not verified at start-up; restart the server")
            if error is not None:
                raise web.HTTPConflict(text=f"refusing to serve vendor/{rel}: {error}. "
                                            "Re-run the asset setup to fetch the official wheel.\n")
        return file_response(path, immutable=True)

    async def model_file(self, request: web.Request) -> web.StreamResponse:
        return self._serve(self.models_dir, request.match_info["path"])

    async def models_index(self, request: web.Request) -> web.Response:
        loop = asyncio.get_running_loop()
        models = await loop.run_in_executor(None, list_models, self.models_dir)
        return web.json_response({"models": models}, headers={"Cache-Control": CACHE_REVALIDATE})

    async def tabmesh_zip(self, request: web.Request) -> web.StreamResponse:
        data, etag = self.source_zip.current()
        if not data:
            raise web.HTTPNotFound(text="pysrc/tabmesh not found under the server root\n")
        headers = {"Cache-Control": CACHE_REVALIDATE}
        inm = request.if_none_match
        if inm and any(tag.value in (etag, "*") for tag in inm):
            resp = web.Response(status=304, headers=headers)
        else:
            resp = web.Response(body=data, content_type="application/zip", headers=headers)
        resp.etag = etag
        return resp

    def _serve(self, base: Path, rel: str) -> web.FileResponse:
        path = safe_join(base, rel)
        if path is None:
            raise web.HTTPNotFound()
        return file_response(path)
