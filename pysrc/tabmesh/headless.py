"""Host side: find a Chromium with WebGPU and the flags that run it headless (tests, CLI).

Playwright cannot download browsers here, so a system Chromium is preferred; Playwright's
own Chromium is used only when no system one exists.
"""
from __future__ import annotations

import os
import shutil

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
