"""Sampler rules on hand-made logits: top-k / top-p, seeds, a row's fault staying its own, and
the logits processors against their definitions (table-driven)."""

import math

import pytest
import torch

from csps.contract.sampling import SamplingContext
from csps.contract.step import ScheduledRequest
from csps.engine.logits_processors import apply_logits_processors, apply_min_p
from csps.engine.logprobs import token_logprobs
from csps.engine.sampler import Sampler, apply_top_k_top_p
from csps.request import SamplingParams


def _requests(ids, params, contexts=None):
    contexts = contexts or [None] * len(ids)
    return [ScheduledRequest(i, [0], 1, [], p, do_sample=True, sampling_context=c)
            for i, p, c in zip(ids, params, contexts, strict=True)]


def test_top_k_keeps_k_largest():
    logits = torch.tensor([1.0, 5.0, 3.0, 4.0])
    masked = apply_top_k_top_p(logits, top_k=2, top_p=1.0)
    assert torch.isfinite(masked).tolist() == [False, True, False, True]


def test_top_p_keeps_smallest_nucleus():
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    masked = apply_top_k_top_p(probs.log(), top_k=-1, top_p=0.7)
    assert torch.isfinite(masked).tolist() == [True, True, False, False]
    # the most likely token always survives, however small top_p is
    masked = apply_top_k_top_p(probs.log(), top_k=-1, top_p=0.01)
    assert torch.isfinite(masked).tolist() == [True, False, False, False]


def test_greedy_rows_take_argmax_and_seeds_repeat():
    logits = torch.randn(3, 50, generator=torch.Generator().manual_seed(0))
    greedy = SamplingParams(temperature=0)
    seeded = SamplingParams(temperature=1.0, seed=123)
    batch = _requests(["a", "b", "c"], [greedy, seeded, seeded])
    first = Sampler().sample(logits, batch)
    second = Sampler(seed=7).sample(logits, batch)
    assert first.failed == {}
    assert first.sampled["a"] == int(logits[0].argmax())
    assert first.sampled == second.sampled  # per-request seeds do not depend on the engine seed
    hot = _requests(["x"], [SamplingParams(temperature=5.0)])
    draws = [Sampler(seed=s).sample(logits[1:2], hot).sampled["x"] for s in range(20)]
    assert len(set(draws)) > 1  # unseeded high-temperature draws vary with the engine seed


def test_sampling_follows_distribution():
    logits = torch.tensor([[0.0, 0.0, -1e9]]).log_softmax(-1)
    sampler = Sampler(seed=0)
    counts = [0, 0, 0]
    batch = _requests(["r"], [SamplingParams(temperature=1.0)])
    for _ in range(400):
        counts[sampler.sample(logits, batch).sampled["r"]] += 1
    assert counts[2] == 0 and 150 < counts[0] < 250


def test_one_rows_fault_fails_that_request_alone(monkeypatch):
    logits = torch.randn(3, 50, generator=torch.Generator().manual_seed(0))
    sampler = Sampler(seed=0)
    real = sampler._sample_row

    def faulty(row_logits, request):
        if request.request_id == "bad":
            raise RuntimeError("injected")
        return real(row_logits, request)
    monkeypatch.setattr(sampler, "_sample_row", faulty)
    hot = SamplingParams(temperature=1.0, seed=1)
    out = sampler.sample(logits, _requests(["a", "bad", "c"], [hot, hot, hot]))
    assert set(out.sampled) == {"a", "c"} and list(out.failed) == ["bad"]
    assert "injected" in out.failed["bad"]


LOGITS = [2.0, -1.0, 0.5, 3.0, -2.0]  # vocab of 5
# (params, context, expected logits), each by its definition (vLLM's)
PROCESSOR_TABLE = [
    (dict(logit_bias={1: 5.0, 4: -1.5}), None, [2.0, 4.0, 0.5, 3.0, -3.5]),
    # repetition 2: positive seen logits halve, negative ones double; prompt and output count
    (dict(repetition_penalty=2.0), SamplingContext((3,), prompt_token_ids=(1, 1)),
     [2.0, -2.0, 0.5, 1.5, -2.0]),
    # frequency 0.5 per occurrence in the output; prompt tokens do not count
    (dict(frequency_penalty=0.5), SamplingContext((0, 0, 2), prompt_token_ids=(3,)),
     [1.0, -1.0, 0.0, 3.0, -2.0]),
    (dict(presence_penalty=1.0), SamplingContext((0, 0, 2)), [1.0, -1.0, -0.5, 3.0, -2.0]),
    (dict(presence_penalty=-0.5, frequency_penalty=0.25), SamplingContext((4, 4)),
     [2.0, -1.0, 0.5, 3.0, -2.0 + 0.5 - 0.5]),
    # min_tokens: EOS (3) and stop ids masked while fewer outputs exist
    (dict(min_tokens=2, stop_token_ids=[1]), SamplingContext((0,), stop_token_ids=(3, 1)),
     [2.0, -math.inf, 0.5, -math.inf, -2.0]),
]


@pytest.mark.parametrize("kwargs,context,expected", PROCESSOR_TABLE)
def test_logits_processors_match_definitions(kwargs, context, expected):
    out = apply_logits_processors(torch.tensor(LOGITS), SamplingParams(**kwargs), context)
    assert out.tolist() == pytest.approx(expected)


def test_min_p_drops_tokens_below_fraction_of_the_best():
    probs = torch.tensor([0.5, 0.3, 0.12, 0.08])
    kept = torch.isfinite(apply_min_p(probs.log(), 0.2)).tolist()
    assert kept == [True, True, True, False]  # 0.08 < 0.2 * 0.5


def test_penalties_change_greedy_choice_and_logprobs_read_raw_logits():
    logits = torch.tensor([LOGITS])
    params = SamplingParams(temperature=0, presence_penalty=2.0, logprobs=2)
    out = Sampler().sample(logits, _requests(["r"], [params], [SamplingContext((3,))]))
    assert out.sampled["r"] == 0  # token 3 (best raw) is penalised below token 0
    entry = out.logprobs["r"]
    raw = torch.tensor(LOGITS).log_softmax(-1)
    assert entry.logprob == pytest.approx(float(raw[0])) and entry.rank == 2
    assert [t for t, _ in entry.top] == [3, 0]


def test_token_logprobs_ranks_and_top():
    logits = torch.tensor([[0.0, 1.0, 2.0], [5.0, 1.0, 1.0]])
    a, b = token_logprobs(logits, [0, 0], [3, 0])
    assert a.rank == 3 and [t for t, _ in a.top] == [2, 1, 0] and b.rank == 1 and b.top == ()
    assert sum(math.exp(lp) for _, lp in a.top) == pytest.approx(1.0)


@pytest.mark.parametrize("kwargs", [dict(temperature=1e-30), dict(top_p=5e-324),
                                    dict(repetition_penalty=1e-40, temperature=0.5)])
def test_tiny_values_still_sample_a_real_token(kwargs):
    logits = torch.tensor([[1.0, 3.0, 2.0, -1.0]])
    params = SamplingParams(seed=0, **kwargs)
    context = SamplingContext((2,), prompt_token_ids=(1,)) if "repetition_penalty" in kwargs \
        else None
    out = Sampler().sample(logits, _requests(["r"], [params], [context]))
    assert out.failed == {} and out.sampled["r"] in (1, 2)


def test_seed_outside_64_bits_is_refused():
    with pytest.raises(ValueError, match="seed"):
        SamplingParams(seed=2**64)


def test_inverse_cdf_draw_matches_probabilities():
    from csps.engine.sampler import draw

    probs = torch.tensor([0.5, 0.0, 0.3, 0.2, 0.0])
    generator = torch.Generator().manual_seed(0)
    counts = torch.bincount(torch.tensor([draw(probs, generator) for _ in range(4000)]),
                            minlength=5).tolist()
    assert counts[1] == counts[4] == 0  # probability 0 is never drawn
    for token, p in [(0, 0.5), (2, 0.3), (3, 0.2)]:  # within 4 standard deviations
        assert abs(counts[token] / 4000 - p) < 4 * (p * (1 - p) / 4000) ** 0.5
