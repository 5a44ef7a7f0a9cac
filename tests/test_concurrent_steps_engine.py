"""Per-instance steps in the real engine, 4 spawned SP workers: short requests keep decoding
on their own instances while a long prompt prefills in slices over a group of two others.

The sps2 configurator (a fitted cost model of the tiny Llama, `--sp-prefill-degrees 2`) gives
the long prompt a group of 2 of the 4 instances; the two short requests, admitted first, were
placed on an instance outside it. Checked: the long prompt ran in several SP slices on that
group; while its slices were in flight (between its first and last slice) steps on instances
outside the group ran the short requests' decodes, and (measured timestamps) their largest
token gap stayed under a quarter of the prefill's duration; and every request's greedy tokens
equal a single-process engine's on the same weights.
"""

from __future__ import annotations

import time

import pytest
from costed_model import copy_with_cost_model, recording_engine

from csps.request import SamplingParams

pytestmark = pytest.mark.slow

PROMPT_LENS = (20, 24, 384)  # two short ones first, then one over the threshold (128)
MAX_TOKENS = (60, 60, 4)
BLOCK = 16


@pytest.fixture(scope="module")
def model_dir(tiny_model_dir, tmp_path_factory):
    return copy_with_cost_model(tiny_model_dir, tmp_path_factory.mktemp("tiny_steps"))


def _serve(model_dir, sp: int, policy: str, **scheduler) -> tuple[dict, list, dict]:
    """Greedy tokens per request, the steps scheduled (with the time each was scheduled) and
    each request's token arrival times (time.monotonic(), as the engine returns them)."""
    engine, steps = recording_engine(model_dir, sp, policy, BLOCK, **scheduler)
    try:
        tokens: dict[str, list[int]] = {}
        times: dict[str, list[float]] = {f"r{i}": [] for i in range(len(PROMPT_LENS))}
        for i, (n, m) in enumerate(zip(PROMPT_LENS, MAX_TOKENS, strict=True)):
            engine.add_request(f"r{i}", None, [3 + (11 * i + j) % 250 for j in range(n)],
                               SamplingParams(temperature=0.0, max_tokens=m, ignore_eos=True))
        while engine.has_unfinished_requests():
            for out in engine.step()[0]:
                tokens[out.request_id] = list(out.outputs[0].token_ids)
                times[out.request_id].append(time.monotonic())
        return tokens, steps, times
    finally:
        engine.shutdown()


def test_decodes_outside_a_prefill_group_keep_running(model_dir):
    reference, _, _ = _serve(model_dir, 1, "sarathi")
    tokens, timed_steps, times = _serve(
        model_dir, 4, "sps2", lockstep=False, sp_prefill_chunk=16,
        cost_model=str(model_dir / "cost.json"), sp_prefill_degrees="2")
    assert tokens == reference
    assert [len(tokens[f"r{i}"]) for i in range(3)] == list(MAX_TOKENS)
    steps = [step for _, step in timed_steps]
    slices = [i for i, s in enumerate(steps) for r in s.scheduler_output.scheduled_requests
              if r.request_id == "r2" and r.is_sp_prefill]
    assert len(slices) == 384 // (2 * 16)  # slices of 16 tokens per rank over 2 ranks
    group = set(steps[slices[0]].instances)
    assert len(group) == 2 and all(set(steps[i].instances) == group for i in slices)
    outside = [s for s in steps[slices[0]:slices[-1]] if not group & set(s.instances)
               and any(r.is_decode for r in s.scheduler_output.scheduled_requests)]
    decoded = {r.request_id for s in outside for r in s.scheduler_output.scheduled_requests}
    assert len(outside) >= len(slices) and decoded == {"r0", "r1"}
    # Measured: from its first slice's scheduling to its first token the long prompt
    # prefills (12 slices); meanwhile the short requests' tokens keep coming. Margin: their
    # largest gap stays under a quarter of the prefill's duration (measured here: under a
    # tenth; a lock-step engine with whole-prompt SP prefill would make it the whole
    # duration). Not less: the 4 workers share 2 cores, so a decode step may wait for the CPU.
    start, end = timed_steps[slices[0]][0], times["r2"][0]
    for rid in ("r0", "r1"):
        during = [t for t in times[rid] if start <= t <= end]
        assert len(during) >= 6, (rid, len(during))
        # the gaps while it runs: from the first slice on, to the prefill's end or its own
        tail = [end] if times[rid][-1] > end else []  # (it may finish before the prefill)
        gaps = [b - a for a, b in zip([start, *during], [*during, *tail], strict=False)]
        assert max(gaps) < (end - start) / 4, (rid, max(gaps), end - start)
