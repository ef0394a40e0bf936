"""Native GPU fixtures: one wgpu device (lavapipe in CI) shared by the GPU tests."""

import asyncio

import pytest


@pytest.fixture(scope="session")
def gpu():
    """A native tabmesh.gpu device; the test is skipped, with the reason, if none is found."""
    try:
        import wgpu  # noqa: F401
    except ImportError:
        pytest.skip("native GPU tests need the `wgpu` package (pip install wgpu)")
    from tabmesh.gpu import NoGPUError, open_device

    try:
        dev = asyncio.run(open_device(backend="native"))
    except NoGPUError as e:
        pytest.skip(f"no wgpu adapter: {e}")
    yield dev
    dev.destroy()


@pytest.fixture(scope="session")
def arun():
    """Run a coroutine to completion (the native backend does not depend on a running loop)."""
    return lambda coro: asyncio.run(coro)
