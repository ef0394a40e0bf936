"""A private network namespace for the browser tests (recipe: shared/ENVIRONMENT.md).

Inside it: `lo` for the server and a veth pair with 10.77.0.1 and a default route that
leads nowhere, so Chromium gathers a host ICE candidate while no packet can leave the
namespace. Needs root (CAP_NET_ADMIN); `create()` returns None where that is not allowed.
"""
from __future__ import annotations

import os
import shutil
import subprocess


def _ip(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], capture_output=True, text=True, timeout=10)


def create(name: str | None = None) -> str | None:
    if shutil.which("ip") is None or (hasattr(os, "geteuid") and os.geteuid() != 0):
        return None
    name = name or f"tabmesh-test-{os.getpid()}"
    if _ip("netns", "add", name).returncode != 0:
        return None
    steps = [
        ("-n", name, "link", "set", "lo", "up"),
        ("-n", name, "link", "add", "v0", "type", "veth", "peer", "name", "v1"),
        ("-n", name, "addr", "add", "10.77.0.1/24", "dev", "v0"),
        ("-n", name, "link", "set", "v0", "up"),
        ("-n", name, "link", "set", "v1", "up"),
        ("-n", name, "route", "add", "default", "via", "10.77.0.254", "dev", "v0"),
    ]
    for step in steps:
        r = _ip(*step)
        if r.returncode != 0:
            destroy(name)
            return None
    return name


def destroy(name: str) -> None:
    _ip("netns", "delete", name)


def exec_prefix(name: str | None) -> list[str]:
    return ["ip", "netns", "exec", name] if name else []


def wrapper_script(name: str, executable: str, path: str) -> str:
    """An executable that starts `executable` inside the namespace (for Playwright)."""
    with open(path, "w") as f:
        f.write(f'#!/bin/sh\nexec ip netns exec {name} {executable} "$@"\n')
    os.chmod(path, 0o755)
    return path


def call_in(name: str | None, fn, *args, timeout_s: float = 300.0):
    """Run fn(*args) in a fresh thread that has entered the namespace `name` (or here when
    None): the test process's own sockets (an HTTP client) then reach the server inside."""
    if not name:
        return fn(*args)
    import ctypes
    import threading
    result: dict = {}

    def target():
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            with open(f"/var/run/netns/{name}") as f:
                if libc.setns(f.fileno(), 0x40000000) != 0:  # CLONE_NEWNET: this thread only
                    raise OSError(ctypes.get_errno(), f"setns into {name} failed")
            result["value"] = fn(*args)
        except BaseException as exc:  # handed to the caller
            result["error"] = exc
    t = threading.Thread(target=target, daemon=True)
    t.start()
    t.join(timeout_s)
    if t.is_alive():
        raise TimeoutError(f"{getattr(fn, '__name__', fn)} did not finish within {timeout_s} s")
    if "error" in result:
        raise result["error"]
    return result["value"]
