"""Host side: find a Chromium with WebGPU and the flags that run it headless (tests, CLI).

Playwright cannot download browsers here, so a system Chromium is preferred; Playwright's
own Chromium is used only when no system one exists.
"""
from __future__ import annotations

import asyncio
import os
import shutil
import threading
from pathlib import Path

CHROMIUM_CANDIDATES = ("/usr/bin/chromium", "/usr/bin/chromium-browser", "/usr/bin/google-chrome")

# --enable-unsafe-webgpu: WebGPU on Linux (SwiftShader without a GPU).
# The background-networking flags keep Chromium from calling Google's hosts at start-up:
# the app must talk to nothing but its own server.
CHROMIUM_ARGS = [
    "--enable-unsafe-webgpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-default-apps",
    "--disable-domain-reliability",
    "--no-first-run",
    "--no-default-browser-check",
    "--metrics-recording-only",
    "--no-sandbox",
]


def find_chromium() -> str | None:
    env = os.environ.get("TABMESH_CHROMIUM")
    if env:
        return env
    for path in CHROMIUM_CANDIDATES:
        if os.path.exists(path):
            return path
    return shutil.which("chromium") or shutil.which("chromium-browser")


def launch_args(executable: str | None = None) -> dict:
    """Keyword arguments for playwright's chromium.launch()."""
    args = {"headless": True, "args": list(CHROMIUM_ARGS)}
    exe = executable or find_chromium()
    if exe:
        args["executable_path"] = exe
    return args


class ServerThread:
    """`tabmesh serve` on an ephemeral localhost port, in a thread of this process."""

    def __init__(self, root: Path, models_dir: Path | None = None):
        from signaling.server import ServerConfig, start
        self.config = ServerConfig(host="127.0.0.1", port=0, root=root, models_dir=models_dir)
        self._start = start
        self.loop = asyncio.new_event_loop()
        self.port = None
        ready = threading.Event()

        def run():
            asyncio.set_event_loop(self.loop)
            self.runner, _site, self.port = self.loop.run_until_complete(self._start(self.config))
            ready.set()
            self.loop.run_forever()
        self.thread = threading.Thread(target=run, daemon=True)
        self.thread.start()
        if not ready.wait(30):
            raise RuntimeError("the bench server did not start")

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/"

    def stop(self) -> None:
        fut = asyncio.run_coroutine_threadsafe(self.runner.cleanup(), self.loop)
        fut.result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)


class HeadlessTab:
    """A local server plus one headless Chromium tab of the app, booted and ready.

        with HeadlessTab(root, models_dir) as tab:
            tab.page.evaluate("tabmesh.llm.generate({...})")
    """

    def __init__(self, root: Path, models_dir: Path | None = None, room: str | None = None,
                 boot_timeout_s: float = 120.0, progress=lambda msg: None):
        self.root, self.models_dir, self.progress = root, models_dir, progress
        self.room = room or "cli-" + os.urandom(3).hex()
        self.boot_timeout_s = boot_timeout_s

    def __enter__(self) -> "HeadlessTab":
        from playwright.sync_api import sync_playwright
        self.server = ServerThread(self.root, self.models_dir)
        self._pw = sync_playwright().start()
        try:
            self.browser = self._pw.chromium.launch(**launch_args())
            self.page = self.browser.new_context().new_page()
            self.page.set_default_timeout(self.boot_timeout_s * 1000)
            self.progress("booting a headless tab (Pyodide, WebGPU)…")
            self.page.goto(f"{self.server.url}?room={self.room}")
            self.info = self.page.evaluate("tabmesh.ready")
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def __exit__(self, *exc) -> None:
        for closer in (lambda: self.browser.close(), lambda: self._pw.stop(), lambda: self.server.stop()):
            try:
                closer()
            except Exception:
                pass


def node_url(server: str, room: str, api_key: str | None, serve_api: bool = True,
             secret: str | None = None) -> str:
    """The page URL a node opens. The API key and the room secret go in the fragment: browsers
    never send it to the server (no log line has them) and the page removes them from the
    address bar."""
    from urllib.parse import urlencode
    base = server if server.endswith("/") else server + "/"
    query = {"room": room, **({"serve": "1"} if serve_api else {})}
    fragment = {k: v for k, v in (("key", api_key), ("secret", secret)) if v}
    return f"{base}?{urlencode(query)}" + (f"#{urlencode(fragment, quote_via=_quote_all)}" if fragment else "")


def _quote_all(value, safe="", encoding=None, errors=None) -> str:
    from urllib.parse import quote
    return quote(value, safe="", encoding=encoding, errors=errors)


def run_node(server: str, room: str, *, api_key: str | None = None, model: str | None = None,
             backend: str | None = None, serve_api: bool = True, headless: bool = True,
             boot_timeout_s: float = 180.0, emit=print, should_stop=lambda: False,
             secret: str | None = None) -> int:
    """One Chromium tab of the app at `server` that joins `room`, loads a model and serves
    the API until `should_stop()` or the tab dies. Emits JSON-able event dicts."""
    from playwright.sync_api import Error as PlaywrightError
    from playwright.sync_api import sync_playwright
    with sync_playwright() as pw:
        browser = pw.chromium.launch(**{**launch_args(), "headless": headless})
        try:
            page = browser.new_context().new_page()
            page.set_default_timeout(boot_timeout_s * 1000)
            died: list[str] = []
            page.on("crash", lambda _p: died.append("the tab crashed"))
            page.on("close", lambda _p: died.append("the tab was closed"))
            page.on("pageerror", lambda err: emit({"event": "page-error", "message": str(err)}))
            page.goto(node_url(server, room, api_key, serve_api, secret))
            info = page.evaluate("tabmesh.ready")
            gpu = info.get("gpu") or {}
            emit({"event": "joined", "peerId": info["peerId"], "room": info["room"],
                  "gpu": {k: gpu.get(k) for k in ("vendor", "architecture")} if gpu else None})
            opts = {k: v for k, v in (("model", model), ("backend", backend)) if v}
            loaded = page.evaluate("(o) => tabmesh.llm.load(o)", opts)
            api = page.evaluate("tabmesh.api.serve(true)") if serve_api else None
            emit({"event": "ready", "model": loaded["model"], "backend": loaded["backend"],
                  "loadS": loaded["loadS"], "api": api})
            while not should_stop() and not died:
                page.wait_for_timeout(250)
                for text in page.evaluate("tabmesh.errors.splice(0)"):
                    emit({"event": "page-error", "message": text})
            if died:
                emit({"event": "stopped", "reason": died[0]})
                return 1
            emit({"event": "stopped", "reason": "asked to stop"})
            return 0
        except PlaywrightError as exc:
            emit({"event": "failed", "message": str(exc).splitlines()[0]})
            return 1
        finally:
            try:
                browser.close()
            except PlaywrightError:
                pass
