"""The one place that knows about Pyodide's FFI.

Modules import `IN_PYODIDE` and the helpers below instead of `js`/`pyodide` directly, so
everything else imports under plain CPython for native tests. Proxies handed to JS
(event handlers) live in a ProxyBag owned by the object that registered them and are
destroyed when it closes; tasks are kept in a TaskSet so none is garbage-collected
mid-flight and every failure is reported, never swallowed.
"""
from __future__ import annotations

import asyncio
import json
import logging
import sys
import time
from typing import Any, Awaitable, Callable, Generator, TypeVar

IN_PYODIDE = sys.platform == "emscripten"

log = logging.getLogger("tabmesh")

if IN_PYODIDE:  # pragma: no cover - exercised by the browser tests
    import js  # type: ignore
    from pyodide.ffi import JsException, create_once_callable, create_proxy, to_js  # type: ignore
else:
    js = None
    JsException = type("JsException", (Exception,), {})

    def create_proxy(fn):  # noqa: D401 - CPython stand-in keeps call sites uniform
        return fn

    def to_js(obj, **_):
        return obj


def js_obj(value: Any):
    """Python dicts/lists/bytes → plain JS objects/arrays/Uint8Array (no Map).

    JSON-able containers go through JSON so that None becomes null (to_js would make it
    undefined, and OpenAI-shaped responses need their nulls)."""
    if not IN_PYODIDE:
        return value
    if isinstance(value, (bytes, bytearray, memoryview)):
        arr = js.Uint8Array.new(len(value))
        arr.assign(bytes(value))
        return arr
    if isinstance(value, (dict, list, tuple)):
        try:
            return js.JSON.parse(json.dumps(value, allow_nan=False))
        except (TypeError, ValueError):
            pass
    return to_js(value, dict_converter=js.Object.fromEntries)


def py_bytes(value) -> bytes:
    """A JS ArrayBuffer / typed array (or Python bytes) → bytes."""
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value)
    if IN_PYODIDE and js.ArrayBuffer.isView(value):
        return value.to_bytes()
    if IN_PYODIDE and value.constructor.name == "ArrayBuffer":
        return js.Uint8Array.new(value).to_bytes()
    raise TypeError(f"expected bytes or a JS binary buffer, got {type(value).__name__}")


def js_error_message(exc: BaseException) -> str:
    """A readable message for a JsException (its JS name and message) or any exception."""
    if isinstance(exc, JsException):
        name = getattr(getattr(exc, "js_error", None), "name", "") or "JsError"
        return f"{name}: {getattr(exc, 'message', str(exc))}"
    return f"{type(exc).__name__}: {exc}"


class ProxyBag:
    """Owns the JS proxies created for one object's event handlers."""

    def __init__(self):
        self._proxies = []

    def __call__(self, fn: Callable) -> Any:
        proxy = create_proxy(fn)
        self._proxies.append(proxy)
        return proxy

    def destroy(self) -> None:
        for proxy in self._proxies:
            destroy = getattr(proxy, "destroy", None)
            if destroy is not None:
                try:
                    destroy()
                except Exception:  # already destroyed
                    pass
        self._proxies.clear()


class TaskSet:
    """Keeps a reference to every task it starts; reports failures through `on_error`."""

    def __init__(self, on_error: Callable[[str, BaseException], None] | None = None):
        self._tasks: set[asyncio.Task] = set()
        self.on_error = on_error

    def spawn(self, coro: Awaitable, what: str = "task") -> asyncio.Task:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)

        def done(t: asyncio.Task) -> None:
            self._tasks.discard(t)
            if t.cancelled():
                return
            exc = t.exception()
            if exc is not None:
                log.warning("%s failed: %s", what, js_error_message(exc))
                if self.on_error is not None:
                    self.on_error(what, exc)

        task.add_done_callback(done)
        return task

    def cancel_all(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        self._tasks.clear()

    def __len__(self) -> int:
        return len(self._tasks)


# ---- cooperative time slicing ---------------------------------------------------------------
# Python in a tab runs on the page's thread: while it computes, no timer, input event or frame
# of the page runs. Long computations (a forward pass, an embedding batch) therefore hand the
# event loop back every SLICE_S seconds of work. Not with asyncio.sleep(0): Pyodide schedules
# that with window.postMessage, and Chromium runs posted messages ahead of due timers, so a
# chain of them starves every setTimeout/setInterval on the page (and Python's own
# asyncio.sleep(delay) timers: signaling heartbeats) for the whole computation. A
# setTimeout(0) instead runs after every timer already due. It is scheduled from the task the
# coroutine resumed in (a posted message, timer nesting level 0), so the 4 ms clamp of nested
# timers never applies: a yield costs well under a millisecond.
SLICE_S = 0.04  # under the 50 ms that Chromium reports as a "long task"
_last_yield = time.perf_counter()
T = TypeVar("T")


async def yield_to_browser() -> None:
    """Let the browser run everything that is due (timers, input, rendering), then go on.
    Under CPython: one turn of the asyncio loop."""
    global _last_yield
    if IN_PYODIDE:  # pragma: no cover - exercised by the browser tests
        await js.Promise.new(create_once_callable(lambda resolve, _reject: js.setTimeout(resolve, 0)))
    else:
        await asyncio.sleep(0)
    _last_yield = time.perf_counter()


async def maybe_yield(slice_s: float = SLICE_S) -> None:
    """``yield_to_browser()`` if more than ``slice_s`` passed since the last yield; else nothing
    (a clock read): cheap enough to call between the layers of a forward pass."""
    if time.perf_counter() - _last_yield >= slice_s:
        await yield_to_browser()


def run_steps(steps: Generator[Any, None, T]) -> T:
    """Run a generator of work pieces (see ``run_sliced``) straight through, without pauses;
    returns its return value."""
    while True:
        try:
            next(steps)
        except StopIteration as done:
            return done.value


async def run_sliced(steps: Generator[Any, None, T], slice_s: float = SLICE_S) -> T:
    """Drive a generator that does its work in pieces (a forward pass yielding after each
    layer), with ``maybe_yield`` between pieces; returns the generator's return value.
    Exactly the work of running it straight through: only the pauses differ."""
    while True:
        try:
            next(steps)
        except StopIteration as done:
            return done.value
        await maybe_yield(slice_s)
