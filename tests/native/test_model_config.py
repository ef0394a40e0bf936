"""LlamaConfig from GGUF metadata: the real SmolLM2 file, and hand-made metadata for the
other architectures, options and every refusal."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import numpy as np
import pytest

from tabmesh.errors import TabmeshError
from tabmesh.gguf import read_gguf_path
from tabmesh.model.config import ContextLengthError, LlamaConfig, ModelConfigError

REPO_ROOT = Path(__file__).resolve().parents[2]
SMOLLM2 = "SmolLM2-135M-Instruct.Q4_1.gguf"


def llama_md(**over) -> dict:
    """SmolLM2's hyper-parameters as metadata; ``over`` replaces keys (None removes one)."""
    md = {
        "general.architecture": "llama",
        "llama.block_count": 30, "llama.context_length": 8192, "llama.embedding_length": 576,
        "llama.feed_forward_length": 1536, "llama.attention.head_count": 9,
        "llama.attention.head_count_kv": 3, "llama.rope.freq_base": 100000.0,
        "llama.attention.layer_norm_rms_epsilon": 1e-5, "llama.vocab_size": 49152,
        "llama.rope.dimension_count": 64, "tokenizer.ggml.bos_token_id": 1,
        "tokenizer.ggml.eos_token_id": 2, "tokenizer.ggml.add_bos_token": False,
    }
    for k, v in over.items():
        k = k.replace("__", ".")
        if v is None:
            md.pop(k, None)
        else:
            md[k] = v
    return md


TIED = {"token_embd.weight": (576, 49152), "output_norm.weight": (576,)}
UNTIED = {**TIED, "output.weight": (576, 49152)}


def qwen2_md(**over) -> dict:
    """Qwen2-0.5B's hyper-parameters."""
    md = {
        "general.architecture": "qwen2",
        "qwen2.block_count": 24, "qwen2.context_length": 32768, "qwen2.embedding_length": 896,
        "qwen2.feed_forward_length": 4864, "qwen2.attention.head_count": 14,
        "qwen2.attention.head_count_kv": 2, "qwen2.rope.freq_base": 1000000.0,
        "qwen2.attention.layer_norm_rms_epsilon": 1e-6, "tokenizer.ggml.bos_token_id": 151643,
        "tokenizer.ggml.eos_token_id": 151645, "tokenizer.ggml.tokens": ["x"] * 151936,
    }
    md.update({k.replace("__", "."): v for k, v in over.items()})
    return md


def test_smollm2_file():
    path = Path(os.environ.get("TABMESH_MODELS_DIR") or REPO_ROOT / "models") / SMOLLM2
    if not path.exists():
        pytest.skip(f"{path} is absent (the repo setup downloads it)")
    cfg = LlamaConfig.from_gguf(read_gguf_path(path))
    assert cfg == LlamaConfig(
        arch="llama", n_layers=30, n_embd=576, n_head=9, n_head_kv=3, head_dim=64, n_ff=1536,
        n_vocab=49152, n_ctx_train=8192, rope_base=100000.0, n_rot=64, rope_layout="normal",
        rms_eps=cfg.rms_eps, tied_output=True, qkv_bias=False, rope_freq_scale=1.0,
        bos_id=1, eos_id=2, add_bos=False)
    assert cfg.rms_eps == pytest.approx(1e-5)
    assert (cfg.q_dim, cfg.kv_dim, cfg.n_group, cfg.rope_neox) == (576, 192, 3, False)


def test_llama_from_metadata():
    cfg = LlamaConfig.from_metadata(llama_md(), TIED)
    assert (cfg.n_layers, cfg.head_dim, cfg.n_vocab, cfg.tied_output) == (30, 64, 49152, True)
    assert LlamaConfig.from_metadata(llama_md(), UNTIED).tied_output is False


def test_qwen2_is_neox_with_biases():
    shapes = {"token_embd.weight": (896, 151936)}
    cfg = LlamaConfig.from_metadata(qwen2_md(), shapes)
    assert (cfg.rope_layout, cfg.rope_neox, cfg.qkv_bias) == ("neox", True, True)
    assert (cfg.head_dim, cfg.n_rot, cfg.n_group, cfg.n_vocab) == (64, 64, 7, 151936)
    assert cfg.rope_base == 1e6 and cfg.tied_output


def test_defaults_and_overrides():
    md = llama_md(llama__rope__freq_base=None, llama__rope__dimension_count=None,
                  llama__attention__head_count_kv=None, llama__vocab_size=None)
    cfg = LlamaConfig.from_metadata(md, TIED)
    assert (cfg.rope_base, cfg.n_rot, cfg.n_head_kv, cfg.n_vocab) == (10000.0, 64, 9, 49152)
    # an explicit key_length (head_dim) wins over n_embd / n_head
    cfg = LlamaConfig.from_metadata(llama_md(llama__attention__key_length=128,
                                             llama__attention__value_length=128,
                                             llama__rope__dimension_count=None), TIED)
    assert (cfg.head_dim, cfg.q_dim, cfg.kv_dim, cfg.n_rot) == (128, 1152, 384, 128)
    cfg = LlamaConfig.from_metadata(llama_md(llama__rope__scaling__type="linear",
                                             llama__rope__scaling__factor=4.0), TIED)
    assert cfg.rope_freq_scale == 0.25
    cfg = LlamaConfig.from_metadata(llama_md(llama__rope__scale_linear=2.0), TIED)
    assert cfg.rope_freq_scale == 0.5
    cfg = LlamaConfig.from_metadata(llama_md(tokenizer__ggml__bos_token_id=None), TIED)
    assert cfg.bos_id is None


@pytest.mark.parametrize("md,shapes,match", [
    (llama_md(general__architecture="gemma"), TIED,
     "architecture 'gemma' is not supported; tabmesh runs llama, qwen2"),
    (llama_md(general__architecture=None), TIED, "'general.architecture' is missing"),
    (llama_md(llama__block_count=None), TIED, "'llama.block_count' is missing"),
    (llama_md(llama__block_count="30"), TIED, "'llama.block_count' must be an integer"),
    (llama_md(llama__attention__head_count_kv=4), TIED, "n_head 9 is not a multiple of n_head_kv 4"),
    (llama_md(llama__attention__head_count=np.array([9] * 30, np.int32)), TIED, "is an array"),
    (llama_md(llama__attention__head_count=0), TIED, "head_count must be positive"),
    (llama_md(llama__attention__head_count=7), TIED, "576 is not a multiple of n_head 7"),
    (llama_md(llama__attention__value_length=32), TIED, "key_length 64 != value_length 32"),
    (llama_md(llama__expert_count=8), TIED, "8 experts"),
    (llama_md(llama__rope__scaling__type="yarn"), TIED, "rope scaling 'yarn' is not supported"),
    (llama_md(llama__rope__dimension_count=96), TIED,
     "rope dimension count 96 must be even and at most head_dim 64"),
    (llama_md(llama__rope__freq_base=0.0), TIED, "freq_base must be a positive number"),
    (llama_md(llama__attention__layer_norm_rms_epsilon=None), TIED, "layer_norm_rms_epsilon' is missing"),
    (llama_md(llama__attention__layer_norm_rms_epsilon=-1.0), TIED, "rms epsilon must be a positive"),
    (llama_md(tokenizer__ggml__eos_token_id=50000), TIED, "eos_id 50000 is outside the vocabulary of 49152"),
    (llama_md(), {"token_embd.weight": (576, 32000)},
     r"token_embd.weight has shape \[576, 32000\], expected \[576, 49152\]"),
    (llama_md(), {**TIED, "rope_freqs.weight": (32,)}, "rope_freqs.weight"),
])
def test_refusals(md, shapes, match):
    with pytest.raises(ModelConfigError, match=match):
        LlamaConfig.from_metadata(md, shapes)


def test_direct_construction_is_validated():
    cfg = LlamaConfig.from_metadata(llama_md(), TIED)
    with pytest.raises(ModelConfigError, match="rope_layout must be 'normal' or 'neox'"):
        dataclasses.replace(cfg, rope_layout="gptj")
    with pytest.raises(ModelConfigError, match="n_ff must be a positive integer"):
        dataclasses.replace(cfg, n_ff=0)
    with pytest.raises(ModelConfigError, match="head_dim 63 must be even"):
        dataclasses.replace(cfg, head_dim=63, n_rot=62)


def test_errors_cross_the_wire():
    for cls in (ModelConfigError, ContextLengthError):
        back = TabmeshError.from_dict(cls("msg").to_dict())
        assert type(back) is cls and str(back) == "msg"
    assert ModelConfigError.code == "bad_model_config"
    assert ContextLengthError.code == "context_length_exceeded"
