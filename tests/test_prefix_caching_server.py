"""Prefix caching as a client sees it: on by default, vLLM's flag pair turns it off, the second
request with the same prompt reports `usage.prompt_tokens_details.cached_tokens` (whole 16-token
blocks short of the last token), /metrics counts the queries and hits in tokens, and the cached
request returns exactly the text of the first (greedy)."""

from __future__ import annotations

import httpx
import pytest
from test_cli import parse
from test_server_e2e import MODEL, ServerProcess

from csps import cli

pytestmark = pytest.mark.slow

BLOCK = 16


def test_the_flag_pair_turns_caching_on_and_off():
    assert cli.config_from_args(parse("m")).cache.enable_prefix_caching is True
    assert cli.config_from_args(parse("m", "--no-enable-prefix-caching")
                                ).cache.enable_prefix_caching is False
    assert cli.config_from_args(parse("m", "--enable-prefix-caching")
                                ).cache.enable_prefix_caching is True


@pytest.fixture(scope="module")
def server(real_model_dir):
    srv = ServerProcess(real_model_dir)
    yield srv
    srv.stop()


def complete(server, prompt: str) -> dict:
    reply = httpx.post(server.url + "/v1/completions", timeout=120, json={
        "model": MODEL, "prompt": prompt, "max_tokens": 8, "temperature": 0})
    assert reply.status_code == 200, reply.text
    return reply.json()


def test_a_repeated_prompt_hits_and_the_counters_agree(server):
    prompt = " ".join(f"Line {i} of a long shared document about caching." for i in range(40))
    first = complete(server, prompt)
    n = first["usage"]["prompt_tokens"]
    assert first["usage"]["prompt_tokens_details"] == {"cached_tokens": 0}
    second = complete(server, prompt)
    expected = (n - 1) // BLOCK * BLOCK
    assert second["usage"]["prompt_tokens_details"] == {"cached_tokens": expected}
    assert second["choices"][0]["text"] == first["choices"][0]["text"]
    assert server.metric("prefix_cache_queries_total") == 2 * n
    assert server.metric("prefix_cache_hits_total") == expected
    server.wait_idle()  # cached blocks are free (evictable), none is held
