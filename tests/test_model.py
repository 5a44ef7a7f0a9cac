"""Our Llama against HF transformers' LlamaForCausalLM on tiny random models, with and without
the paged KV cache, plus config parsing and weight-loading errors."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import TINY_LLAMA, save_tiny_llama
from transformers import LlamaForCausalLM as HFLlamaForCausalLM

from csps.attention import AttentionMetadata
from csps.kvcache.paged_cache import allocate_kv_caches
from csps.layers.linear import linear
from csps.model.arch_config import LlamaArchConfig
from csps.model.loader import iterate_weights, load_model

ATOL = 1e-4  # float32 logits, same model, different kernels and op order
LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 32}


@pytest.fixture(scope="module", params=["tied", "untied+llama3", "linear"])
def model_dir(request, tiny_model_dir, tmp_path_factory):
    if request.param == "tied":
        return tiny_model_dir
    if request.param == "linear":
        return save_tiny_llama(tmp_path_factory.mktemp("tiny_linear"), seed=2,
                               rope_scaling={"rope_type": "linear", "factor": 2.0})
    return save_tiny_llama(tmp_path_factory.mktemp("tiny_llama3"), seed=1,
                           tie_word_embeddings=False, rope_scaling=dict(LLAMA3_ROPE))


def hf_logits(folder, token_ids: list[int]) -> torch.Tensor:
    hf = HFLlamaForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.inference_mode():
        return hf(torch.tensor([token_ids])).logits[0]  # [T, V]


def test_no_cache_forward_matches_hf(model_dir):
    token_ids = torch.randint(0, 256, (70,), generator=torch.Generator().manual_seed(0)).tolist()
    model = load_model(model_dir)
    with torch.inference_mode():
        metadata = AttentionMetadata.build_no_cache([70], "cpu")
        hidden = model(torch.tensor(token_ids), torch.arange(70), None, metadata)
        logits = model.compute_logits(hidden)
    assert logits.dtype == torch.float32 and logits.shape == (70, 256)
    torch.testing.assert_close(logits, hf_logits(model_dir, token_ids), atol=ATOL, rtol=0)


def test_paged_chunked_prefill_and_decode_match_hf(model_dir):
    """Two requests: A prefills in chunks of 7 while B, already prefilled, decodes."""
    gen = torch.Generator().manual_seed(1)
    seqs = [torch.randint(0, 256, (n,), generator=gen).tolist() for n in (42, 32)]
    expected = [hf_logits(model_dir, s) for s in seqs]
    model = load_model(model_dir)
    block_size = 4
    caches = allocate_kv_caches(2, 32, block_size, 2, 16, torch.float32, "cpu")
    tables = [list(range(31, 19, -1)), [3, 9, 1, 17, 5, 11, 7, 13]]  # non-contiguous blocks
    computed = [0, 0]
    steps = [[(1, 26)]] + [[(0, 7), (1, 1)]] * 4 + [[(0, 7)], [(0, 5), (1, 1)], [(0, 1)],
                                                     [(1, 1), (0, 1)]]
    with torch.inference_mode():
        for step in steps:
            metadata = AttentionMetadata.build(
                [(computed[r], n, tables[r]) for r, n in step], block_size, "cpu")
            ids = [t for r, n in step for t in seqs[r][computed[r]:computed[r] + n]]
            pos = [p for r, n in step for p in range(computed[r], computed[r] + n)]
            logits = model.compute_logits(model(torch.tensor(ids), torch.tensor(pos), caches,
                                                metadata))
            row = 0
            for r, n in step:
                torch.testing.assert_close(
                    logits[row:row + n], expected[r][computed[r]:computed[r] + n],
                    atol=ATOL, rtol=0)
                row += n
                computed[r] += n
    assert computed == [42, 32]


def test_bfloat16_load_and_forward(tiny_model_dir):
    model = load_model(tiny_model_dir, dtype="bfloat16")
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    with torch.inference_mode():
        hidden = model(torch.arange(5), torch.arange(5), None,
                       AttentionMetadata.build_no_cache([5], "cpu"))
        assert hidden.dtype == torch.bfloat16
        assert model.compute_logits(hidden).dtype == torch.float32


def test_config_accepts_transformers_4_and_5_spellings():
    base = {k: v for k, v in TINY_LLAMA.items() if k != "rope_theta"}
    v4 = LlamaArchConfig.from_hf_dict({**base, "rope_theta": 5e5, "rope_scaling": LLAMA3_ROPE})
    v5 = LlamaArchConfig.from_hf_dict(
        {**base, "rope_parameters": {**LLAMA3_ROPE, "rope_theta": 5e5}})
    assert v4 == v5 and v4.rope_theta == 5e5 and v4.rope_scaling["rope_type"] == "llama3"
    legacy = LlamaArchConfig.from_hf_dict({**base, "rope_scaling": {"type": "linear",
                                                                    "factor": 2.0}})
    assert legacy.rope_scaling == {"rope_type": "linear", "factor": 2.0}
    plain = LlamaArchConfig.from_hf_dict({**base, "rope_parameters": {"rope_type": "default",
                                                                      "rope_theta": 1e4}})
    assert plain.rope_scaling is None and plain.head_dim == 16 and plain.eos_token_ids == [2]


@pytest.mark.parametrize("change, match", [
    ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "rope type"),
    ({"num_key_value_heads": 3}, "multiple"),
    ({"attention_bias": True}, "bias"),
    ({"sliding_window": 4096}, "sliding"),
    ({"hidden_act": "gelu"}, "hidden_act"),
])
def test_config_rejects_unsupported(change, match):
    with pytest.raises(ValueError, match=match):
        LlamaArchConfig.from_hf_dict({**TINY_LLAMA, **change})


def test_load_weights_reports_missing_and_unknown(tiny_model_dir):
    model = load_model(tiny_model_dir)
    weights = dict(iterate_weights(tiny_model_dir))
    del weights["model.layers.1.self_attn.k_proj.weight"]
    with pytest.raises(ValueError, match="lacks 1 parameters"):
        model.load_weights(weights.items())
    with pytest.raises(ValueError, match="has no parameter"):
        model.load_weights([("model.layers.9.mlp.up_proj.weight", torch.zeros(1))])
    config = json.loads((tiny_model_dir / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"]


def test_onednn_linear_matches_torch_linear(tiny_model_dir, monkeypatch):
    gen = torch.Generator().manual_seed(3)
    for rows in (1, 16, 300):
        x, w = torch.randn(rows, 576, generator=gen), torch.randn(960, 576, generator=gen)
        torch.testing.assert_close(linear(x, w), torch.nn.functional.linear(x, w),
                                   atol=1e-4, rtol=1e-5)
    ids = torch.arange(20)
    metadata = AttentionMetadata.build_no_cache([20], "cpu")
    with torch.inference_mode():
        fast = load_model(tiny_model_dir)(ids, ids, None, metadata)
        monkeypatch.setattr("csps.layers.linear.ONEDNN_LINEAR", False)
        plain = load_model(tiny_model_dir)(ids, ids, None, metadata)
    torch.testing.assert_close(fast, plain, atol=1e-5, rtol=0)
