"""loongserve on per-instance steps in the real engine, 4 spawned SP workers (gloo, fp32).

Two short requests start first on instances of their own; then a long prompt arrives. The
policy plans it on the idle instances (a contiguous window that leaves out the decoding
ones), runs one ring SP prefill on that sub-group's process group and keeps its KV on fewer
instances than computed it (scale-down). Checked: the group and the scale-down; decode steps
of the short requests on instances outside the group were scheduled while the prefill was in
flight (between its scheduling and its first token); and every request's greedy tokens equal
a single-process engine's on the same weights (the sub-group ring with scale-down is exact).
"""

from __future__ import annotations

import time

import pytest
from costed_model import copy_with_cost_model

from csps.config import CacheConfig, EngineConfig, ModelConfig, ParallelConfig, SchedulerConfig
from csps.request import SamplingParams

pytestmark = pytest.mark.slow

BLOCK = 16
SHORT = {"r0": (20, 80), "r1": (24, 80)}  # prompt length, max_tokens
LONG = ("r2", 480, 4)


@pytest.fixture(scope="module")
def model_dir(tiny_model_dir, tmp_path_factory):
    """The tiny Llama with a cost model whose attention is dear: a long prompt pays off
    over several instances, a short one does not."""
    return copy_with_cost_model(tiny_model_dir, tmp_path_factory.mktemp("tiny_loong"),
                                "tiny-attention-bound", per_attn_pair_s=2e-6,
                                per_collective_s=1e-3)


def _serve(model_dir, sp: int, policy: str, **scheduler):
    """Greedy tokens per request, the steps (with the time each was scheduled) and each
    request's token arrival times (time.monotonic())."""
    from csps.engine.llm_engine import LLMEngine

    engine = LLMEngine(EngineConfig(
        model=ModelConfig(model=str(model_dir), max_model_len=512, dtype="float32"),
        cache=CacheConfig(block_size=BLOCK, kv_cache_memory_bytes=8 << 20),
        scheduler=SchedulerConfig(policy=policy, max_num_batched_tokens=512, **scheduler),
        parallel=ParallelConfig(sequence_parallel_size=sp)))
    steps, schedule_steps = [], engine.scheduler.schedule_steps

    def recording():
        new = schedule_steps()
        steps.extend((time.monotonic(), step) for step in new)
        return new
    engine.scheduler.schedule_steps = recording
    params = dict(temperature=0.0, ignore_eos=True)
    try:
        tokens, times = {}, {rid: [] for rid in (*SHORT, LONG[0])}

        def add(rid, n, m):
            engine.add_request(rid, None, [3 + (11 * len(rid) * n + j) % 250 for j in range(n)],
                               SamplingParams(max_tokens=m, **params))
        for rid, (n, m) in SHORT.items():
            add(rid, n, m)
        while engine.has_unfinished_requests():
            if LONG[0] not in tokens and all(len(times[r]) >= 3 for r in SHORT):
                add(*LONG)
                tokens[LONG[0]] = []
            for out in engine.step()[0]:
                tokens[out.request_id] = list(out.outputs[0].token_ids)
                times[out.request_id].append(time.monotonic())
        return tokens, steps, times
    finally:
        engine.shutdown()


def test_a_long_prompt_prefills_on_idle_instances_while_decodes_go_on(model_dir):
    reference, _, _ = _serve(model_dir, 1, "sarathi")
    tokens, timed_steps, times = _serve(model_dir, 4, "loongserve",
                                        cost_model=str(model_dir / "cost.json"))
    assert tokens == reference
    assert {rid: len(t) for rid, t in tokens.items()} == {"r0": 80, "r1": 80, "r2": 4}
    (sp_at, sp_step), = [(t, s) for t, s in timed_steps
                         for r in s.scheduler_output.scheduled_requests
                         if r.request_id == LONG[0] and r.is_sp_prefill]
    (long_prefill,) = sp_step.scheduler_output.scheduled_requests  # an SP prefill runs alone
    computed = {i for i, n in enumerate(long_prefill.sp_chunk_lens) if n}
    kept = {x.rank for x in long_prefill.kv_ranges}
    assert computed == set(sp_step.instances) and len(computed) >= 2
    assert kept < computed  # scale-down: the ring left the KV on fewer instances
    short_home = {x.rank for s in (timed_steps[0][1],)
                  for r in s.scheduler_output.scheduled_requests for x in r.kv_ranges}
    assert not short_home & computed  # the window left the decoding instances out
    end = times[LONG[0]][0]
    during = [s for t, s in timed_steps if sp_at < t < end and not computed & set(s.instances)
              and any(r.is_decode for r in s.scheduler_output.scheduled_requests)]
    assert during, "no decode step ran beside the SP prefill"
