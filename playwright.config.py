"""Browser settings for the test suite (loaded by tests/browser/conftest.py).

One headless Chromium per test session (pytest-playwright's session-scoped `browser`),
WebGPU through SwiftShader, no network access beyond the test's own server. The flags
themselves live in tabmesh.headless so the CLI launches the same browser.
"""
from tabmesh.headless import launch_args

LAUNCH_ARGS = launch_args()
# Page boot = Pyodide (~3 s) + numpy + our package + GPU self-test on SwiftShader.
BOOT_TIMEOUT_MS = 90_000
ACTION_TIMEOUT_MS = 30_000
# The test server drops silent peers quickly so the leave/timeout tests stay short.
HEARTBEAT_INTERVAL_S = 0.5
HEARTBEAT_TIMEOUT_S = 2.0
# WebRTC runs inside a network namespace the tests make (see tests/browser/netns.py)
# when the machine allows it; otherwise on the host's own addresses.
USE_NETNS = True
# LLM tests: loading 97 MB of weights and generating on SwiftShader / Pyodide-numpy is slow.
LLM_TIMEOUT_MS = 300_000
# Greedy tokens compared with llama.cpp per backend (bounded by software-GPU speed in CI).
GREEDY_TOKENS_IN_BROWSER = {"webgpu": 5, "numpy": 5}  # step 5 of "short" is a near-tie (gap 0.33) in llama.cpp
