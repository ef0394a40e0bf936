"""`tabmesh generate --json` runs the real page engine in headless Chromium (inside the test's netns)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import netns

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "model_q4_1.json"


def test_generate_json_matches_llama_cpp_greedy(app):
    ref = next(p for p in json.loads(FIXTURE.read_text())["prompts"] if p["name"] == "short")
    cmd = netns.exec_prefix(app.ns) + [sys.executable, "-m", "tabmesh", "generate", "--prompt", ref["text"],
                                       "--max-tokens", "5", "--backend", "numpy", "--json"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=dict(os.environ, PYTHONUNBUFFERED="1"))
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout)
    assert set(result) >= {"prompt_tokens", "tokens", "text", "timings"}
    assert result["prompt_tokens"] == ref["tokens"]
    assert result["tokens"] == ref["greedy"]["tokens"][:5]
    assert result["text"].startswith(" Paris.")
    assert set(result["timings"]) >= {"load_s", "ttft_s", "prefill_tok_s", "decode_tok_s"}
    assert "booting a headless tab" in out.stderr  # progress goes to stderr, JSON alone to stdout
