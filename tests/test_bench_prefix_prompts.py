"""Prefix-sharing prompts of `csps bench serve` traces, checked on the token ids the server sees:
requests sharing k leading hash ids share k whole blocks of tokens (BOS included), unrelated
ones nothing beyond the BOS, and an ideal 16-token-block prefix cache over those ids hits what
`trace_reuse` promises. The real SmolLM2 tokenizer (no BOS) and a byte tokenizer with a BOS."""

from __future__ import annotations

import importlib.util
import json
import os
from types import SimpleNamespace

import pytest

from csps.bench.prompts import PromptBuilder, load_tokenizer
from csps.bench.serve import block_tokens, prepare_requests, uses_token_ids
from csps.bench.trace_reuse import trace_reuse
from csps.bench.workload import WorkloadConfig, build_workload
from csps.server.prompts import completion_inputs

pytestmark = pytest.mark.skipif(importlib.util.find_spec("needlehaystack") is None,
                                reason="needlehaystack is not installed")
KV_BLOCK = 16  # tokens per KV block of the server's prefix cache
# Mooncake-style chained ids: equal ids, equal prefixes. (input_length, hash_ids) at 512 tokens
# per block, replayed at length_scale 1/16: 32-token blocks.
ROWS = [(1500, [0, 1, 2]), (1400, [0, 1, 3]), (900, [0, 4]), (1000, [5, 6]),
        (2000, [0, 1, 2, 7]), (300, [0]), (1100, [8, 9, 10]), (700, [0, 1])]


class ByteTokenizer:
    """One token per byte plus a BOS (256): the form of tokenizers that add a BOS."""

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return ([256] if add_special_tokens else []) + list(text.encode())

    def decode(self, token_ids: list[int], skip_special_tokens: bool = True) -> str:
        return bytes(t for t in token_ids if t < 256).decode(errors="replace")

    @property
    def vocab_size(self) -> int:
        return 257


@pytest.fixture(scope="module")
def smollm2(real_model_dir):
    return load_tokenizer(str(real_model_dir))  # what load_tokenizer('smollm2-135m') loads


@pytest.fixture
def workload(tmp_path) -> WorkloadConfig:
    trace = tmp_path / "trace.jsonl"
    trace.write_text("".join(json.dumps({"timestamp": 100 * i, "input_length": n,
                                         "output_length": 4, "hash_ids": ids}) + "\n"
                             for i, (n, ids) in enumerate(ROWS)))
    return WorkloadConfig(dataset_name="trace", dataset_path=str(trace), length_scale=1 / 16)


def server_ids(tokenizer, prompt) -> list[int]:
    """The prompt's token ids as the server's /v1/completions computes them."""
    [(_, ids)] = completion_inputs(SimpleNamespace(tokenizer=tokenizer), prompt)
    return ids


def shared_blocks(a: tuple[int, ...], b: tuple[int, ...]) -> int:
    return len(os.path.commonprefix([list(a), list(b)]))


TOKENIZERS = [pytest.param("smollm2", marks=pytest.mark.slow), "bytes"]


def make_tokenizer(name: str, request):
    return request.getfixturevalue("smollm2") if name == "smollm2" else ByteTokenizer()


@pytest.mark.parametrize("tokenizer_name", TOKENIZERS)
def test_shared_hash_blocks_are_shared_server_tokens(tokenizer_name, request, workload):
    tokenizer = make_tokenizer(tokenizer_name, request)
    specs = build_workload(workload)
    block = block_tokens(workload)
    assert block == 32 and uses_token_ids("auto", "/v1/completions", specs)
    prepared = prepare_requests(workload, tokenizer, specs=specs)
    ids = [server_ids(tokenizer, p.prompt) for p in prepared]
    num_bos = len(PromptBuilder(tokenizer, text="a b c").special_prefix)
    assert num_bos == (0 if tokenizer_name == "smollm2" else 1)
    for spec, prompt, seen in zip(specs, prepared, ids, strict=True):
        assert isinstance(prompt.prompt, list) and len(seen) == prompt.input_len == spec.input_len
        assert seen[:num_bos] == [256] * num_bos
    for i in range(len(specs)):
        for j in range(i):
            k = shared_blocks(specs[i].hash_ids, specs[j].hash_ids)
            common = len(os.path.commonprefix([ids[i], ids[j]]))
            if k == 0:
                assert common == num_bos, (i, j)  # nothing beyond the BOS
                continue
            promised = min(num_bos + k * block, len(ids[i]), len(ids[j]))
            assert common >= promised, (i, j)  # every shared block, to its last token
            # past them, at most a coincidental token or two: no further whole KV block
            assert common == min(len(ids[i]), len(ids[j])) or common - promised < KV_BLOCK


def ideal_cache_hits(prompts: list[list[int]]) -> int:
    """Prompt tokens an unbounded cache of full 16-token blocks, hashed chained from the start
    as the server hashes them, finds already computed."""
    cached: set[tuple[int, ...]] = set()
    hits = 0
    for ids in prompts:
        found = True
        for end in range(KV_BLOCK, len(ids) + 1, KV_BLOCK):
            key = tuple(ids[:end])
            found = found and key in cached
            hits += KV_BLOCK if found else 0
            cached.add(key)
    return hits


@pytest.mark.parametrize("tokenizer_name", TOKENIZERS)
def test_ideal_prefix_cache_hits_what_the_trace_promises(tokenizer_name, request, workload):
    tokenizer = make_tokenizer(tokenizer_name, request)
    specs = build_workload(workload)
    prompts = [server_ids(tokenizer, p.prompt) for p in prepare_requests(workload, tokenizer)]
    total = sum(len(p) for p in prompts)
    promised = trace_reuse(specs, block_tokens(workload)) * total
    hits = ideal_cache_hits(prompts)
    # The cache holds full KV blocks only: a request loses at most its last partial one.
    assert promised - KV_BLOCK * len(prompts) < hits <= promised
    assert hits > 0.3 * total


def test_text_prompts_stay_for_chat_and_random_workloads(workload):
    specs = build_workload(workload)
    assert not uses_token_ids("auto", "/v1/chat/completions", specs)
    assert not uses_token_ids("auto", "/v1/completions", build_workload(WorkloadConfig()))
    assert uses_token_ids("token-ids", "/v1/completions", [])
    assert not uses_token_ids("text", "/v1/completions", specs)
    with pytest.raises(ValueError):
        uses_token_ids("token-ids", "/v1/chat/completions", specs)
    prepared = prepare_requests(workload, ByteTokenizer(), token_ids=False)
    assert all(isinstance(p.prompt, str) for p in prepared)
