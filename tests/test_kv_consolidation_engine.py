"""KV consolidation in the real engine, 4 spawned SP workers (`--consolidate-decode-kv`).

A long prompt prefills in slices over all 4 instances; the step of its last slice carries the
moves of its KV onto one rank, and from then on it decodes on that instance alone. A second
long prompt, sent once the first decodes, gets a group of the other three instances (none of
them holds a decode), so the first one's decodes never ride in its slices. Checked: the moves,
the instances of every later step of each request, greedy tokens equal to a single-process
engine's on the same weights (the moved KV is the KV: every decode attends over it), and no
block held once both are done.
"""

from __future__ import annotations

import pytest
from costed_model import copy_with_cost_model, recording_engine

from csps.request import SamplingParams

pytestmark = pytest.mark.slow

BLOCK = 16
PROMPTS = {"r0": (384, 24), "r1": (256, 6)}  # id -> (prompt tokens, max_tokens)


@pytest.fixture(scope="module")
def model_dir(tiny_model_dir, tmp_path_factory):
    return copy_with_cost_model(tiny_model_dir, tmp_path_factory.mktemp("tiny_consolidation"))


def _prompt(i: int, n: int) -> list[int]:
    return [3 + (7 * i + 5 * j) % 250 for j in range(n)]


def _serve(model_dir, sp: int, policy: str, **scheduler):
    """Greedy tokens per request, the steps scheduled, and the KV manager's free blocks at
    the end against its total."""
    engine, steps = recording_engine(model_dir, sp, policy, BLOCK, **scheduler)
    try:
        tokens: dict[str, list[int]] = {}

        def add(i: int, rid: str) -> None:
            n, m = PROMPTS[rid]
            engine.add_request(rid, None, _prompt(i, n),
                               SamplingParams(temperature=0.0, max_tokens=m, ignore_eos=True))
        add(0, "r0")
        while engine.has_unfinished_requests():
            for out in engine.step()[0]:
                tokens[out.request_id] = list(out.outputs[0].token_ids)
            if "r1" not in tokens and len(tokens.get("r0", ())) == 2:
                add(1, "r1")
                tokens["r1"] = []
        manager = engine.scheduler.kv_cache_manager
        return tokens, steps, (manager.num_free_blocks, manager.num_total_blocks)
    finally:
        engine.shutdown()


def _steps_of(steps, rid: str):
    return [(s, r) for s in steps for r in s.scheduler_output.scheduled_requests
            if r.request_id == rid]


def test_a_consolidated_request_decodes_alone_and_exactly(model_dir):
    reference, _, _ = _serve(model_dir, 1, "sarathi")
    tokens, steps, (free, total) = _serve(
        model_dir, 4, "sps2", sp_prefill_chunk=16, cost_model=str(model_dir / "cost.json"),
        consolidate_decode_kv=100.0)
    assert tokens == reference
    assert [len(tokens[r]) for r in PROMPTS] == [m for _, m in PROMPTS.values()]
    assert free == total  # every block back (prefix-cached ones count as free)
    steps = [step for _, step in steps]
    moving = [s for s in steps if s.scheduler_output.kv_moves]
    assert [{m.request_id for m in s.scheduler_output.kv_moves} for s in moving] == [
        {"r0"}, {"r1"}]
    targets = {}
    for step, (rid, (n, max_tokens)) in zip(moving, PROMPTS.items(), strict=True):
        moves = step.scheduler_output.kv_moves
        targets[rid] = target = moves[0].dst.rank
        ours = _steps_of(steps, rid)
        slices = [s for s, r in ours if r.is_sp_prefill]
        group = slices[0].instances
        assert all(s.instances == group for s in slices[1:]) and slices[-1] is step
        # every rank of the group but the target sends its share of the prompt's blocks
        assert {m.dst.rank for m in moves} == {target} and target in group
        assert {m.src.rank for m in moves} == set(group) - {target}
        last = next(r for s, r in ours if s is step)  # its KV once the last slice ran
        assert last.kv_ranges[-1].end == n
        assert [m.src for m in moves] == [t for t in last.kv_ranges if t.rank != target]
        decodes = [(s, r) for s, r in ours if r.is_decode]
        assert len(decodes) == max_tokens - 1
        assert all(s.instances == (target,) and {t.rank for t in r.kv_ranges} == {target}
                   for s, r in decodes)
    # the second prompt's group leaves out the first one's decode instance
    r1_group = next(s for s, r in _steps_of(steps, "r1") if r.is_sp_prefill).instances
    assert targets["r0"] not in r1_group and len(r1_group) == 3
