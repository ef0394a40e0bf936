"""The `tabmesh` command's host-side subcommands (generate/bench need a browser: see tests/browser)."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
MODEL = ROOT / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"
FIXTURE = ROOT / "tests" / "fixtures" / "tokenizer_smollm2.json"


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "tabmesh", *args], capture_output=True, text=True, timeout=120)


def test_tokenize_prints_llama_cpp_ids():
    if not MODEL.exists():
        pytest.skip(f"{MODEL} is absent: `make test` runs setup, which downloads it")
    fixture = json.loads(FIXTURE.read_text())
    # an emoji-bearing corpus line, with llama.cpp's ids for add_special=False, parse_special=True
    i, text = next((i, t) for i, t in enumerate(fixture["corpus"]) if any(ord(ch) > 0x1F000 for ch in t))
    out = run_cli("tokenize", "--model", str(MODEL), "--json", "--no-special", "--parse-special", text)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout) == fixture["cases"][i]["ids_special"]


def test_unknown_arguments_and_missing_model_are_clear_errors():
    out = run_cli("serve", "--bogus")
    assert out.returncode == 2 and "unrecognized arguments" in out.stderr
    out = run_cli("generate", "--prompt", "hi", "--model", "/nonexistent.gguf")
    assert out.returncode != 0 and "model file not found" in out.stderr
