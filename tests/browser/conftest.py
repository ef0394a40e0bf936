"""Browser-test harness: one server and one Chromium per session, inside a test-made netns.

Fixtures:
  app          the running `tabmesh serve` (base URL, netns name, log)
  browser      pytest-playwright's session browser, launched with playwright.config.py
  new_browser  a factory for extra browser *processes* (peers that must not share one)
  open_node    opens the page in a fresh context, waits for tabmesh.ready, records requests
"""
from __future__ import annotations

import os
import secrets
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from urllib.parse import urlparse

import pytest

import netns
from settings import ROOT, config


def pytest_collection_modifyitems(items):
    for item in items:
        if "tests/browser/" in str(item.fspath).replace(os.sep, "/"):
            item.add_marker(pytest.mark.browser)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class App:
    def __init__(self, proc, base_url, ns, lines):
        self.proc, self.base_url, self.ns, self.lines = proc, base_url, ns, lines

    @property
    def origin(self) -> str:
        u = urlparse(self.base_url)
        return f"{u.scheme}://{u.netloc}"

    def room_url(self, room: str) -> str:
        return f"{self.base_url}?room={room}"


@pytest.fixture(scope="session")
def app(tmp_path_factory):
    if not (ROOT / "vendor" / "pyodide" / "pyodide.mjs").exists():
        pytest.fail("vendored Pyodide missing: run `make test` (it runs `tabmesh setup` first)")
    ns = netns.create() if config.USE_NETNS else None
    port = 8765 if ns else _free_port()
    cmd = netns.exec_prefix(ns) + [
        sys.executable, "-m", "tabmesh", "serve", "--port", str(port),
        "--heartbeat-interval", str(config.HEARTBEAT_INTERVAL_S),
        "--heartbeat-timeout", str(config.HEARTBEAT_TIMEOUT_S)]
    env = dict(os.environ, PYTHONUNBUFFERED="1", TABMESH_ROOT=str(ROOT))
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    lines: list[str] = []
    started = threading.Event()

    def pump():
        for line in proc.stdout:
            lines.append(line.rstrip("\n"))
            if "serving http://" in line:
                started.set()
    threading.Thread(target=pump, daemon=True).start()
    if not started.wait(30):
        proc.kill()
        if ns:
            netns.destroy(ns)
        pytest.fail("tabmesh serve did not start:\n" + "\n".join(lines[-30:]))
    yield App(proc, f"http://127.0.0.1:{port}/", ns, lines)
    proc.terminate()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
    if ns:
        netns.destroy(ns)


@pytest.fixture(scope="session")
def browser_type_launch_args(app, tmp_path_factory):
    args = dict(config.LAUNCH_ARGS)
    if app.ns:
        exe = args.get("executable_path")
        if not exe:
            pytest.fail("a system Chromium is needed to run inside the test network namespace")
        wrapper = tmp_path_factory.mktemp("chromium") / "chromium-in-netns"
        args["executable_path"] = netns.wrapper_script(app.ns, exe, str(wrapper))
    return args


@pytest.fixture(scope="session")
def new_browser(browser_type, browser_type_launch_args):
    """Extra browser processes, closed at session end (or earlier by the test)."""
    opened = []

    def launch(without_args: tuple[str, ...] = ()):
        args = dict(browser_type_launch_args)
        args["args"] = [a for a in args["args"] if a not in without_args]
        b = browser_type.launch(**args)
        opened.append(b)
        return b
    yield launch
    for b in opened:
        if b.is_connected():
            b.close()


class Node:
    """One page of the app with its tabmesh.ready info and the requests it made."""

    def __init__(self, page, info, requests):
        self.page, self.info, self.requests = page, info, requests

    @property
    def peer_id(self) -> str:
        return self.info["peerId"]

    def peers(self) -> list[dict]:
        return self.page.evaluate("tabmesh.peers()")

    def wait_peers(self, predicate, timeout_s: float = 30.0, what: str = "peer condition"):
        deadline = time.monotonic() + timeout_s
        while True:
            peers = self.peers()
            if predicate(peers):
                return peers
            if time.monotonic() > deadline:
                raise AssertionError(f"{what} not met within {timeout_s} s; peers: {peers}")
            time.sleep(0.1)


@pytest.fixture
def open_node(app, browser):
    contexts = []

    def open_(room: str, on_browser=None, tab_of: Node | None = None, expect_ready: bool = True,
              fragment: str = "", init_script: str | None = None) -> Node:
        """A node in a fresh context of `on_browser` (default: the session browser), or a
        second tab beside `tab_of` (same context: shared cache, maybe the same renderer).
        `fragment` is appended to the URL after "#" (e.g. "secret=…"); `init_script` runs in
        the page before any of its own scripts."""
        if tab_of is not None:
            ctx = tab_of.page.context
        else:
            ctx = (on_browser or browser).new_context()
            ctx.set_default_timeout(config.ACTION_TIMEOUT_MS)
            contexts.append(ctx)
        page = ctx.new_page()
        if init_script:
            page.add_init_script(init_script)
        requests: list[str] = []
        page.on("request", lambda r: requests.append(r.url))
        page.goto(app.room_url(room) + (f"#{fragment}" if fragment else ""))
        page.wait_for_function("!!window.tabmesh", timeout=config.BOOT_TIMEOUT_MS)
        if not expect_ready:
            return Node(page, None, requests)
        info = page.evaluate("Promise.race([tabmesh.ready, new Promise((_, rej) => "
                             f"setTimeout(() => rej(new Error('boot timeout')), {config.BOOT_TIMEOUT_MS}))])")
        return Node(page, info, requests)

    yield open_
    for ctx in contexts:
        try:
            ctx.close()
        except Exception:
            pass


@pytest.fixture
def room():
    return "t-" + secrets.token_hex(4)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if report.failed and call.when == "call":
        app_ = item.funcargs.get("app")
        if app_ is not None:
            report.sections.append(("tabmesh serve (last 60 lines)", "\n".join(app_.lines[-60:])))
