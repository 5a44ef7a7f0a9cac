"""Sampler rules on hand-made logits."""

import torch

from csps.engine.sampler import Sampler, apply_top_k_top_p
from csps.request import SamplingParams


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
    first, failed = Sampler().sample(logits, ["a", "b", "c"], [greedy, seeded, seeded])
    second, _ = Sampler(seed=7).sample(logits, ["a", "b", "c"], [greedy, seeded, seeded])
    assert failed == {}
    assert first["a"] == int(logits[0].argmax())
    assert first == second  # per-request seeds do not depend on the engine seed
    draws = [Sampler(seed=s).sample(logits[1:2], ["x"], [SamplingParams(temperature=5.0)])[0]["x"]
             for s in range(20)]
    assert len(set(draws)) > 1  # unseeded high-temperature draws vary with the engine seed


def test_sampling_follows_distribution():
    logits = torch.tensor([[0.0, 0.0, -1e9]]).log_softmax(-1)
    sampler = Sampler(seed=0)
    counts = [0, 0, 0]
    for _ in range(400):
        counts[sampler.sample(logits, ["r"], [SamplingParams(temperature=1.0)])[0]["r"]] += 1
    assert counts[2] == 0 and 150 < counts[0] < 250


def test_one_rows_fault_fails_that_request_alone(monkeypatch):
    logits = torch.randn(3, 50, generator=torch.Generator().manual_seed(0))
    sampler = Sampler(seed=0)
    real = sampler._sample_row

    def faulty(row_logits, request_id, p):
        if request_id == "bad":
            raise RuntimeError("injected")
        return real(row_logits, request_id, p)
    monkeypatch.setattr(sampler, "_sample_row", faulty)
    hot = SamplingParams(temperature=1.0, seed=1)
    sampled, failed = sampler.sample(logits, ["a", "bad", "c"], [hot, hot, hot])
    assert set(sampled) == {"a", "c"} and list(failed) == ["bad"]
    assert "injected" in failed["bad"]
