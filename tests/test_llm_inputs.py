"""LLM.generate takes vLLM's prompt forms (a string, token ids, TextPrompt, TokensPrompt; alone
or in a list) with the same greedy output for each, and refuses other shapes naming the form."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from csps import LLM, SamplingParams, TextPrompt, TokensPrompt
from csps.inputs import batch_prompts, parse_prompt
from tests.test_executor import save_byte_tokenizer

TEXT = "Hello, world"
GREEDY = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)


def encode(text: str) -> list[int]:
    return [1, *text.encode()]


@pytest.fixture(scope="module")
def llm(tiny_model_dir, tmp_path_factory) -> LLM:
    folder: Path = tmp_path_factory.mktemp("tiny_llm")
    shutil.copytree(tiny_model_dir, folder, dirs_exist_ok=True)
    save_byte_tokenizer(folder)
    return LLM(str(folder), max_model_len=256, kv_cache_memory_bytes=1 << 22)


def test_every_form_gives_the_string_forms_greedy_output(llm):
    ids = llm.get_tokenizer().encode(TEXT)
    [plain] = llm.generate(TEXT, GREEDY)
    forms = [ids, {"prompt": TEXT}, {"prompt_token_ids": ids}, TextPrompt(prompt=TEXT),
             TokensPrompt(prompt_token_ids=ids), [TEXT], [ids], [{"prompt": TEXT}],
             [{"prompt_token_ids": ids}], (TEXT,)]
    for form in forms:
        [out] = llm.generate(form, GREEDY)
        assert out.prompt_token_ids == ids, form
        assert out.outputs[0].token_ids == plain.outputs[0].token_ids, form
        assert out.outputs[0].text == plain.outputs[0].text, form
    mixed = llm.generate([TEXT, ids, {"prompt": TEXT}, {"prompt_token_ids": ids}], GREEDY)
    assert [o.outputs[0].token_ids for o in mixed] == [plain.outputs[0].token_ids] * 4
    assert [o.prompt for o in mixed] == [TEXT, None, TEXT, None]


def test_a_bad_form_is_refused_before_anything_runs(llm):
    with pytest.raises(ValueError, match="without 'prompt' or 'prompt_token_ids'"):
        llm.generate([TEXT, {"text": TEXT}], GREEDY)
    assert not llm.llm_engine.has_unfinished_requests()  # the good prompt was not queued
    assert llm.generate([], GREEDY) == []


def test_forms_parse_to_text_and_token_ids():
    assert parse_prompt("Hi", encode) == ("Hi", [1, 72, 105])
    assert parse_prompt([5, 6], encode) == (None, [5, 6])
    assert parse_prompt({"prompt": "Hi"}, encode) == ("Hi", [1, 72, 105])
    assert parse_prompt({"prompt_token_ids": [5, 6]}, encode) == (None, [5, 6])
    assert parse_prompt({"prompt_token_ids": [5], "prompt": "x"}, encode) == ("x", [5])
    assert batch_prompts("Hi") == ["Hi"] and batch_prompts([5, 6]) == [[5, 6]]
    assert batch_prompts({"prompt": "Hi"}) == [{"prompt": "Hi"}]
    assert batch_prompts([[5], "Hi"]) == [[5], "Hi"]


@pytest.mark.parametrize("prompt,error,match", [
    ({}, ValueError, r"prompts\[0\] is a dict without 'prompt' or 'prompt_token_ids'"),
    ({"prompt": "Hi", "multi_modal_data": {}}, ValueError, "does not support.*multi_modal"),
    ({"prompt": 5}, TypeError, r"\['prompt'\] must be a string"),
    ({"prompt": None}, TypeError, r"\['prompt'\] must be a string; got NoneType"),
    ({"prompt_token_ids": "Hi"}, TypeError, r"\['prompt_token_ids'\] must be a list of token"),
    ({"prompt_token_ids": [1, "a"]}, TypeError, "integer token ids; it holds str 'a'"),
    ({"prompt_token_ids": [1.0]}, TypeError, "integer token ids"),
    (3.5, TypeError, "must be a string, a list of token ids, .*TokensPrompt"),
    ([[1, 2]], TypeError, r"prompts\[0\] must be a list of integer token ids; it holds list"),
])
def test_bad_forms_name_the_form(prompt, error, match):
    with pytest.raises(error, match=match):
        parse_prompt(prompt, encode)


def test_bad_batches_name_the_form():
    with pytest.raises(TypeError, match="or a list of those; got int"):
        batch_prompts(5)
    with pytest.raises(TypeError, match=r"prompts\[1\] must be a string"):
        [parse_prompt(p, encode, i) for i, p in enumerate(batch_prompts([[1, 2], 3]))]
