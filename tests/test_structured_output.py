"""Structured output on the real SmolLM2 tokenizer: exact masks on hand-written prefixes,
random sampling under the mask always yields valid JSON, invalid schemas raise ValueError."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from csps.engine.structured_output import (
    GrammarCompiler,
    RequestGrammar,
    validate_structured_outputs,
)
from csps.engine.token_bitmask import apply_token_bitmask, bitmask_words, unpack_torch
from csps.model.tokenizer import Tokenizer
from csps.request import StructuredOutputsParams

regex = pytest.importorskip("regex")  # partial matching: "is this a prefix of the language"

WS = r"[\x20\x0A\x0D\x09]{0,32}"  # the whitespace one gap may hold (grammar_spec.py)
COLOR_SCHEMA = {"type": "object", "properties": {
    "color": {"enum": ["red", "green", "blue"]}, "n": {"type": "integer"}},
    "required": ["color", "n"], "additionalProperties": False}
PERSON_SCHEMA = {"type": "object", "properties": {
    "name": {"type": "string", "maxLength": 20},
    "age": {"type": "integer", "minimum": 0, "maximum": 150},
    "status": {"enum": ["active", "inactive", "pending"]},
    "skills": {"type": "array", "items": {"type": "string", "maxLength": 12}, "maxItems": 4}},
    "required": ["name", "age", "status", "skills"], "additionalProperties": False}


@pytest.fixture(scope="module")
def tokenizer(real_model_dir) -> Tokenizer:
    return Tokenizer(real_model_dir)


@pytest.fixture(scope="module")
def vocab_size(real_model_dir) -> int:
    return json.loads((real_model_dir / "config.json").read_text())["vocab_size"]


@pytest.fixture(scope="module")
def compiler(tokenizer, vocab_size) -> GrammarCompiler:
    return GrammarCompiler(tokenizer, vocab_size)


@pytest.fixture(scope="module")
def token_texts(tokenizer) -> list[str]:
    return [tokenizer.decode([i], skip_special_tokens=False)
            for i in range(tokenizer.vocab_size)]


def _spec(schema: dict) -> StructuredOutputsParams:
    return StructuredOutputsParams(json=json.dumps(schema))


def _allowed(grammar: RequestGrammar, vocab_size: int) -> set[int]:
    row = torch.zeros(vocab_size)  # [V] fp32
    grammar.apply_mask(row)
    return set(torch.nonzero(row == 0).view(-1).tolist())


def _after(compiler, tokenizer, schema: dict, prefix: str) -> RequestGrammar:
    grammar = compiler.compile(_spec(schema))
    for token_id in tokenizer.encode(prefix, add_special_tokens=False):
        grammar.accept(token_id)
    return grammar


@pytest.mark.parametrize("prefix, rest", [
    ('{"color":', WS + '"(red|green|blue)"' + WS + "," + WS + '"n"' + WS + ":" + WS
     + "-?(0|[1-9][0-9]*)" + WS + r"\}"),
    ('{"color": "green", "n": 1', "[0-9]*" + WS + r"\}"),
    ('{"color": "blue", "n": -', "(0|[1-9][0-9]*)" + WS + r"\}"),
])
def test_mask_is_exactly_the_viable_tokens(compiler, tokenizer, vocab_size, token_texts,
                                           prefix, rest):
    """Allowed = every token whose text can continue the prefix toward a match, nothing else
    (no EOS mid-object, no special tokens, no ids past the tokenizer)."""
    grammar = _after(compiler, tokenizer, COLOR_SCHEMA, prefix)
    pattern = regex.compile(rest)
    expected = {i for i, text in enumerate(token_texts)
                if text and pattern.fullmatch(text, partial=True)}
    assert len(expected) > 1
    assert _allowed(grammar, vocab_size) == expected


def test_complete_output_allows_only_eos_then_terminates(compiler, tokenizer, vocab_size):
    grammar = _after(compiler, tokenizer, COLOR_SCHEMA, '{"color": "red", "n": 12}')
    eos = tokenizer.eos_token_id
    assert _allowed(grammar, vocab_size) == {eos} and not grammar.is_terminated()
    grammar.accept(eos)
    assert grammar.is_terminated() and _allowed(grammar, vocab_size) == {eos}
    grammar.accept(eos)  # ignore_eos: more EOS are fine, anything else is not
    with pytest.raises(ValueError):
        grammar.accept(tokenizer.encode(" ", add_special_tokens=False)[0])
    grammar.rollback(2)
    assert not grammar.is_terminated() and _allowed(grammar, vocab_size) == {eos}
    grammar.reset()
    assert grammar.num_accepted == 0
    assert _allowed(grammar, vocab_size) == _allowed(compiler.compile(_spec(COLOR_SCHEMA)),
                                                     vocab_size)


def test_refused_token_raises_and_leaves_the_state(compiler, tokenizer, vocab_size):
    grammar = _after(compiler, tokenizer, COLOR_SCHEMA, '{"color":')
    before = _allowed(grammar, vocab_size)
    for bad in (tokenizer.eos_token_id, tokenizer.encode("}", add_special_tokens=False)[0]):
        with pytest.raises(ValueError, match="not allowed"):
            grammar.accept(bad)
    assert _allowed(grammar, vocab_size) == before
    assert grammar.num_accepted == len(tokenizer.encode('{"color":', add_special_tokens=False))
    other = compiler.compile(_spec(COLOR_SCHEMA))  # a cache hit: its own state
    assert other.num_accepted == 0 and _allowed(other, vocab_size) != before


def test_eos_where_the_grammar_could_go_on_rolls_back(compiler, tokenizer, vocab_size):
    """A top-level integer: "12" may grow or end; EOS ends it, and rolling EOS back
    reopens the digits."""
    grammar = _after(compiler, tokenizer, {"type": "integer"}, "12")
    open_mask = _allowed(grammar, vocab_size)
    assert tokenizer.eos_token_id in open_mask and len(open_mask) > 1
    grammar.accept(tokenizer.eos_token_id)
    assert grammar.is_terminated() and _allowed(grammar, vocab_size) == {tokenizer.eos_token_id}
    grammar.rollback(1)
    assert not grammar.is_terminated() and _allowed(grammar, vocab_size) == open_mask


def test_bitmask_unpack_paths_agree():
    """The accelerator unpack (torch ops) and the CPU one (numpy) give the same mask."""
    vocab_size = 1000  # not a multiple of 32: the last word is partly padding
    words = torch.randint(-2**31, 2**31 - 1, (bitmask_words(vocab_size),), dtype=torch.int32)
    row = torch.zeros(vocab_size)
    apply_token_bitmask(row, words)
    keep = unpack_torch(words, vocab_size, torch.device("cpu"))
    assert torch.equal(row == 0, keep)
    assert bool(keep[33]) == bool(int(words[1]) >> 1 & 1)


def test_ids_past_the_tokenizer_are_masked(tokenizer):
    wide = GrammarCompiler(tokenizer, tokenizer.vocab_size + 64)
    row = torch.zeros(tokenizer.vocab_size + 64)  # [V + 64] fp32
    wide.compile(StructuredOutputsParams(json_object=True)).apply_mask(row)
    assert torch.isinf(row[tokenizer.vocab_size:]).all() and (row == 0).any()


def _sample(grammar: RequestGrammar, vocab_size: int, gen: torch.Generator,
            bias: torch.Tensor | None, max_tokens: int) -> list[int]:
    token_ids = []
    while len(token_ids) < max_tokens and not grammar.is_terminated():
        logits = torch.randn(vocab_size, generator=gen)  # [V] fp32
        if bias is not None:
            logits += bias
        grammar.apply_mask(logits)
        token_id = int(torch.multinomial(torch.softmax(logits, -1), 1, generator=gen))
        grammar.accept(token_id)
        token_ids.append(token_id)
    return token_ids


def _check_person(obj) -> None:
    try:
        import jsonschema
    except ImportError:
        assert set(obj) == set(PERSON_SCHEMA["required"])
        assert isinstance(obj["name"], str) and len(obj["name"]) <= 20
        assert type(obj["age"]) is int and 0 <= obj["age"] <= 150
        assert obj["status"] in ("active", "inactive", "pending")
        assert isinstance(obj["skills"], list) and len(obj["skills"]) <= 4
        assert all(isinstance(s, str) and len(s) <= 12 for s in obj["skills"])
    else:
        jsonschema.validate(obj, PERSON_SCHEMA)


def test_random_sampling_follows_the_schema(compiler, tokenizer, vocab_size):
    gen = torch.Generator().manual_seed(0)
    for _ in range(20):
        grammar = compiler.compile(_spec(PERSON_SCHEMA))
        token_ids = _sample(grammar, vocab_size, gen, None, max_tokens=200)
        assert grammar.is_terminated(), tokenizer.decode(token_ids)
        _check_person(json.loads(tokenizer.decode(token_ids)))


def test_random_sampling_json_object_parses(compiler, tokenizer, vocab_size, token_texts):
    """Any-JSON has unbounded strings and nesting: closers are favoured so walks end."""
    bias = torch.tensor([6.0 if any(c in t for c in '"}]') else 0.0 for t in token_texts])
    gen = torch.Generator().manual_seed(0)
    for _ in range(10):
        grammar = compiler.compile(StructuredOutputsParams(json_object=True))
        token_ids = _sample(grammar, vocab_size, gen, bias, max_tokens=300)
        assert grammar.is_terminated(), tokenizer.decode(token_ids)
        assert isinstance(json.loads(tokenizer.decode(token_ids)), dict)


@pytest.mark.parametrize("schema, message", [
    ('{"type": ', "not valid JSON"), ('{"type": "strin"}', "strin"),
    ('{"type": "integer", "minimum": "x"}', "minimum"), ("[1, 2]", "object or"),
    ('{"type": "string", "pattern": "(("}', "regex"),
])
def test_invalid_schema_raises_value_error(compiler, schema, message):
    spec = StructuredOutputsParams(json=schema)
    with pytest.raises(ValueError, match=message):
        validate_structured_outputs(spec)
    with pytest.raises(ValueError, match=message):
        compiler.compile(spec)


def test_api_side_check_imports_no_torch():
    code = ("import sys; from csps.engine.grammar_spec import validate_structured_outputs\n"
            "print([m for m in sys.modules if m == 'torch'])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.strip() == "[]", out.stderr
