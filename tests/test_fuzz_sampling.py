"""Hypothesis against the real server: random sampling parameters, valid and not (NaN, inf,
out of range, wrong types), sent 8 at a time. Never a 5xx; every 200 is a well-formed OpenAI
response, every 4xx an OpenAI error naming a parameter of the request; afterwards the engine
is alive and greedy decoding still gives the text it gave before."""

from __future__ import annotations

import asyncio
import json
import math

import httpx
import pytest
from hypothesis import HealthCheck, Phase, example, given, settings
from hypothesis import strategies as st
from test_server_e2e import MODEL, ServerProcess

BATCH = 8  # requests in flight at once
MAX_TOKENS = 4
GREEDY = {"model": MODEL, "prompt": "The capital of France is", "max_tokens": 8,
          "temperature": 0}
PROMPTS = ["Hello", "The capital of France is", ["Hi", "One two three"], [1, 2, 3, 4]]
MESSAGES = [[{"role": "user", "content": "Hi"}],
            [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Count."}]]

# Values no parameter should ever turn into a 5xx. NaN and inf go out as JSON's NaN/Infinity
# (Python's json reads them) and as strings.
JUNK = st.sampled_from([None, "hot", "nan", "inf", "-Infinity", True, [], {}, [1.0], -1, 10**30,
                        math.nan, math.inf, -math.inf, 5e-324, 1e-300, -1e-300, 1e300])


def floats(low: float, high: float) -> st.SearchStrategy:
    edges = st.sampled_from([low, high, 0.0, 1.0, math.nextafter(high, math.inf),
                             math.nextafter(low, -math.inf)])
    return st.one_of(st.floats(low, high), edges, JUNK)


def ints(low: int, high: int, *outside: int) -> st.SearchStrategy:
    """Integers in [low, high], then `outside` (default: one step past each end) and JUNK."""
    outside = outside or (low - 1, high + 1)
    return st.one_of(st.integers(low, high), st.sampled_from(outside), JUNK)


def lengths() -> st.SearchStrategy:
    """max_tokens values, never null (valid, and meaning the whole context: slow)."""
    return ints(1, MAX_TOKENS, 0, -1, 10**6).filter(lambda v: v is not None)


STOPS = st.one_of(st.text(max_size=3), st.lists(st.text(max_size=3), max_size=3), JUNK)
TOKEN_KEYS = st.one_of(st.integers(0, 49151).map(str), st.sampled_from(["-1", "49152", "x", ""]))
LOGIT_BIAS = st.one_of(st.dictionaries(TOKEN_KEYS, floats(-100, 100), max_size=3), JUNK)

SHARED = {  # parameter -> values for both endpoints
    "temperature": floats(0.0, 2.0),
    "top_p": floats(0.0, 1.0),
    "top_k": ints(-1, 60000),
    "min_p": floats(0.0, 1.0),
    "presence_penalty": floats(-2.0, 2.0),
    "frequency_penalty": floats(-2.0, 2.0),
    "repetition_penalty": floats(0.0, 3.0),
    "seed": st.one_of(st.integers(-(2**63), 2**64), JUNK),
    "stop": STOPS,
    "stop_token_ids": st.one_of(st.lists(ints(0, 49151), max_size=3), JUNK),
    "logit_bias": LOGIT_BIAS,
    "n": ints(1, 3),
    "min_tokens": ints(0, MAX_TOKENS),
    "ignore_eos": st.one_of(st.booleans(), JUNK),
    "include_stop_str_in_output": st.booleans(),
    "max_tokens": lengths(),
}
COMPLETION_ONLY = {"logprobs": ints(0, 20), "echo": st.booleans(), "prompt_logprobs": ints(0, 2)}
CHAT_ONLY = {"logprobs": st.one_of(st.booleans(), JUNK), "top_logprobs": ints(0, 20),
             "max_completion_tokens": lengths(),
             "response_format": st.sampled_from([{"type": "text"}, {"type": "json_object"},
                                                 {"type": "xml"}, {"type": "json_schema"}])}


# What this fuzzing found, each a 5xx or a stalled engine before the API bounded it.
REGRESSIONS = [(path, {"model": MODEL, "max_tokens": 2, **body}) for path, body in [
    ("/v1/completions", {"prompt": "Hi", "seed": 2**64}),  # manual_seed overflow
    ("/v1/completions", {"prompt": "Hi", "temperature": 1e-300}),  # logits / T = inf
    ("/v1/completions", {"prompt": "Hi", "temperature": 1e-38, "logprobs": 3}),
    ("/v1/completions", {"prompt": "Hi", "top_p": 5e-324}),  # 0 in fp32: every token masked
    ("/v1/completions", {"prompt": [1, 2, 3, 4], "repetition_penalty": 8e-63, "n": 3,
                         "seed": 895, "stream": True}),  # an error event inside a 200
    ("/v1/chat/completions", {"messages": MESSAGES[0], "n": 10**9}),  # 10**9 queued requests
    ("/v1/chat/completions", {"messages": MESSAGES[0], "seed": -(2**63) - 1, "n": 2}),
    ("/v1/chat/completions", {"messages": MESSAGES[1], "temperature": 5e-324,
                              "repetition_penalty": 1e-300, "stream": True}),
]]


@st.composite
def request_bodies(draw) -> tuple[str, dict]:
    chat = draw(st.booleans())
    options = {**SHARED, **(CHAT_ONLY if chat else COMPLETION_ONLY)}
    names = draw(st.lists(st.sampled_from(sorted(options)), max_size=6, unique=True))
    body = {"model": MODEL, "max_tokens": draw(st.integers(1, MAX_TOKENS)),
            "stream": draw(st.booleans())}
    body |= {name: draw(options[name]) for name in names}
    if body["stream"] and draw(st.booleans()):
        body["stream_options"] = {"include_usage": True}
    if chat:
        body["messages"] = draw(st.sampled_from(MESSAGES))
        return "/v1/chat/completions", body
    body["prompt"] = draw(st.sampled_from(PROMPTS))
    return "/v1/completions", body


@pytest.fixture(scope="module")
def server(real_model_dir):
    srv = ServerProcess(real_model_dir, "--max-model-len", "256", "--kv-cache-memory-bytes",
                        "64M", "--max-num-seqs", "16")
    yield srv
    srv.stop()


def greedy_text(server) -> str:
    reply = httpx.post(server.url + "/v1/completions", json=GREEDY, timeout=60)
    assert reply.status_code == 200, reply.text
    return reply.json()["choices"][0]["text"]


async def send(client: httpx.AsyncClient, path: str, body: dict) -> httpx.Response:
    content = json.dumps(body)  # allow_nan: NaN and Infinity as Python's json writes them
    headers = {"Content-Type": "application/json"}
    if not body.get("stream"):
        return await client.post(path, content=content, headers=headers)
    request = client.build_request("POST", path, content=content, headers=headers)
    reply = await client.send(request, stream=True)
    await reply.aread()
    return reply


async def send_batch(url: str, batch: list[tuple[str, dict]]) -> list[httpx.Response]:
    async with httpx.AsyncClient(base_url=url, timeout=120) as client:
        return await asyncio.gather(*(send(client, path, body) for path, body in batch))


def num_choices(path: str, body: dict) -> int:
    prompt = body.get("prompt")
    num_prompts = len(prompt) if isinstance(prompt, list) and isinstance(prompt[0], str) else 1
    return num_prompts * body.get("n", 1)


def check_error(reply: httpx.Response, body: dict) -> None:
    error = reply.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}, error
    assert error["message"] and "Traceback" not in error["message"], error
    assert error["type"] == "invalid_request_error", error
    assert error["param"] in body, f"the error names {error['param']!r}, not a field sent: {error}"


def check_choice(choice: dict, chat: bool, body: dict) -> None:
    assert choice["finish_reason"] in ("stop", "length"), choice
    # an accepted `logprobs` was read as pydantic reads it: chat's as a bool, a number here
    if chat:
        assert choice["message"]["role"] == "assistant"
        assert isinstance(choice["message"]["content"], str)
        wants_logprobs = body.get("logprobs") is True
    else:
        assert isinstance(choice["text"], str)
        wants_logprobs = body.get("logprobs") is not None
    assert (choice["logprobs"] is not None) == wants_logprobs, choice


def check_full(reply: httpx.Response, path: str, body: dict) -> None:
    data = reply.json()
    chat = path.endswith("chat/completions")
    assert data["object"] == ("chat.completion" if chat else "text_completion")
    assert data["model"] == MODEL and data["id"]
    assert sorted(c["index"] for c in data["choices"]) == list(range(num_choices(path, body)))
    for choice in data["choices"]:
        check_choice(choice, chat, body)
    usage = data["usage"]
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    assert 0 < usage["completion_tokens"] <= MAX_TOKENS * num_choices(path, body)


def check_stream(reply: httpx.Response, path: str, body: dict) -> None:
    assert reply.headers["content-type"].startswith("text/event-stream")
    events = reply.text.removesuffix("\n\n").split("\n\n")
    assert events[-1] == "data: [DONE]", reply.text
    chunks = [json.loads(event.removeprefix("data: ")) for event in events[:-1]]
    assert all("error" not in chunk for chunk in chunks), reply.text  # a 500 in disguise
    chat = path.endswith("chat/completions")
    finished = []
    for chunk in chunks:
        assert chunk["object"] == ("chat.completion.chunk" if chat else "text_completion")
        for choice in chunk["choices"]:
            assert isinstance(choice["delta"]["content"] if chat else choice["text"], str)
            if choice["finish_reason"] is not None:
                assert choice["finish_reason"] in ("stop", "length"), choice
                finished.append(choice["index"])
    assert sorted(finished) == list(range(num_choices(path, body))), reply.text
    if body.get("stream_options") == {"include_usage": True}:
        assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["total_tokens"] > 0


def check_reply(reply: httpx.Response, path: str, body: dict) -> None:
    where = f"{path} {json.dumps(body)} -> {reply.status_code} {reply.text[:500]}"
    assert reply.status_code < 500, where
    try:
        if reply.status_code == 200:
            (check_stream if body.get("stream") is True else check_full)(reply, path, body)
        else:
            assert reply.status_code in (400, 404, 422), where
            check_error(reply, body)
    except (AssertionError, KeyError, TypeError, ValueError) as exc:
        raise AssertionError(f"{where}: {exc!r}") from exc


def test_random_sampling_parameters_never_break_the_server(server):
    before = greedy_text(server)

    @settings(max_examples=40, deadline=None, derandomize=True, database=None,
              phases=[Phase.explicit, Phase.generate],  # no shrinking against a live server
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    @given(st.lists(request_bodies(), min_size=BATCH, max_size=BATCH))
    @example(REGRESSIONS)
    def fuzz(batch):
        replies = asyncio.run(send_batch(server.url, batch))
        for reply, (path, body) in zip(replies, batch, strict=True):
            check_reply(reply, path, body)

    fuzz()
    assert httpx.get(server.url + "/health").status_code == 200
    assert greedy_text(server) == before
    server.wait_idle()
