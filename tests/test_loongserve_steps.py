"""The loongserve policy on per-instance steps (pure Python, fake clock): windows of idle
instances first, concurrent ESP groups, decodes that keep running outside a prefill group,
scale-down onto the fewest consecutive instances, scale-up onto a neighbour, the borrowing
test, and random workloads with aborts whose steps end in time order."""

from __future__ import annotations

import heapq
import random

import pytest
from policy_harness import FakeCostModel, make_predictor, make_request, make_scheduler

from csps.scheduler import RunnerOutput
from csps.scheduler.loongserve_windows import choose_window, contiguous_runs

# attention dominates: a long prompt prefills faster over more instances
QUADRATIC = FakeCostModel(per_token=1e-4, per_pair=1e-5)


def loong(sp_size, cost=QUADRATIC, num_blocks=64, max_len=512, **config):
    predictor = make_predictor(sp_size, cost, sp_attention="ring")
    config.setdefault("max_num_batched_tokens", 512)
    return make_scheduler("loongserve", sp_size, predictor, num_blocks=num_blocks,
                          max_len=max_len, **config), predictor


class Clock:
    """Steps end at start + their predicted time; the earliest ends first."""

    def __init__(self, sched, predictor):
        self.sched, self.predictor, self.now = sched, predictor, 0.0
        self.in_flight, self.started, self._seq = [], [], 0
        self.first_token_s, self.token_times = {}, {}

    def launch(self):
        for step in self.sched.schedule_steps():
            end = self.now + self.predictor.iteration_time(step.scheduler_output)
            self._seq += 1
            heapq.heappush(self.in_flight, (end, self._seq, step))
            self.started.append((self.now, end, step))
        busy = [i for *_, s in self.in_flight for i in s.instances]
        assert len(busy) == len(set(busy)), "two steps in flight on one instance"

    def finish_next(self):
        self.now, _, step = heapq.heappop(self.in_flight)
        out = step.scheduler_output
        sampled = {r.request_id: 7 for r in out.scheduled_requests if r.do_sample}
        for rid in sampled:
            self.first_token_s.setdefault(rid, self.now)
            self.token_times.setdefault(rid, []).append(self.now)
        self.sched.update_from_step(step, RunnerOutput(sampled))
        self.sched.check_invariants()
        return step

    def run(self, arrivals=(), aborts=None, limit=20000):
        pending, aborts = sorted(arrivals, key=lambda a: a[0]), dict(aborts or {})
        for _ in range(limit):
            while pending and pending[0][0] <= self.now:
                self.sched.add_request(pending.pop(0)[1])
            for when in [t for t in aborts if t <= self.now]:
                self.sched.abort_requests([aborts.pop(when)])
            self.launch()
            if self.in_flight:
                self.finish_next()
            elif pending:
                self.now = pending[0][0]
            else:
                assert not self.sched.has_unfinished_requests(), "work left but no step"
                return self
        raise AssertionError("the workload did not finish")


def sp_steps(clock, request_id):
    return [(start, end, s) for start, end, s in clock.started
            if any(r.is_sp_prefill and r.request_id == request_id
                   for r in s.scheduler_output.scheduled_requests)]


@pytest.mark.parametrize("ranks,runs", [([], []), ([3, 0, 1], [(0, 1), (3,)]),
                                        ([2, 3, 4], [(2, 3, 4)])])
def test_contiguous_runs(ranks, runs):
    assert contiguous_runs(ranks) == runs


def test_the_window_grows_from_the_longest_idle_run_into_the_cheapest_neighbours():
    cost = {0: 0.5, 1: 0.0, 2: 0.0, 3: 0.1, 4: 0.0, 5: 0.9}.get
    window = choose_window(range(6), [1, 2, 4], cost, lambda i: 10)
    assert window.base == (1, 2) and window.order == (1, 2, 3, 4, 0, 5)
    assert window.first(3) == (1, 2, 3)
    held = choose_window([0, 1, 3], [], cost, lambda i: 10)  # 2 is prefilling: no idle
    assert held.base == () and held.order == (1, 0)
    assert choose_window([], [], cost, lambda i: 10) is None


def test_two_long_prompts_prefill_side_by_side_on_disjoint_groups():
    sched, predictor = loong(4)
    clock = Clock(sched, predictor)
    for rid in ("a", "b"):  # each fills the budget alone: one ESP group per prompt
        sched.add_request(make_request(rid, 400, max_tokens=3))
    clock.launch()
    groups = [s.instances for *_, s in clock.started]
    assert len(groups) == 2 and not set(groups[0]) & set(groups[1])
    assert all(len(g) > 1 for g in groups)
    clock.run()


def test_decodes_outside_a_prefill_group_keep_running():
    sched, predictor = loong(4)
    clock = Clock(sched, predictor)
    sched.add_request(make_request("short", 8, max_tokens=200))
    clock.launch()
    clock.finish_next()  # 'short' decodes on one instance
    (home,) = set(sched.kv_cache_manager.placement("short").ranks)
    sched.add_request(make_request("long", 480, max_tokens=2))
    clock.run()
    ((start, end, step),) = sp_steps(clock, "long")
    assert home not in step.instances  # idle instances first
    during = [t for t in clock.token_times["short"] if start < t <= end]
    assert len(during) >= 2, "the decode stalled for the prefill"


def first_ring_prefill(num_instances=4, num_blocks=100, prompt_len=480):
    """An idle engine's ring SP prefill of one long prompt: (scheduler, predictor, clock, the
    prompt's ScheduledRequest in the step)."""
    sched, predictor = loong(num_instances, num_blocks=num_blocks)
    sched.add_request(make_request("long", prompt_len, max_tokens=2))
    clock = Clock(sched, predictor)
    clock.launch()
    ((_, _, step),) = sp_steps(clock, "long")
    (r,) = step.scheduler_output.scheduled_requests
    return sched, predictor, clock, r


def test_scale_down_keeps_the_kv_on_the_fewest_consecutive_instances():
    sched, _, _, r = first_ring_prefill()  # 400 tokens a rank
    computed = [i for i, n in enumerate(r.sp_chunk_lens) if n]
    kept = sorted({x.rank for x in r.kv_ranges})
    assert len(computed) > 2 and len(kept) == 2 and kept[1] == kept[0] + 1
    assert sched.kv_cache_manager.group("long") == tuple(kept)


def test_a_decode_out_of_kv_scales_up_onto_a_neighbour_instead_of_being_preempted():
    sched, predictor = loong(2, cost=FakeCostModel(), num_blocks=12)  # 48 tokens a rank
    manager, widened = sched.kv_cache_manager, []
    widen = manager.widen_group
    manager.widen_group = lambda rid, rank: (widened.append((rid, rank)), widen(rid, rank))
    sched.policy.fit(2, 512, 4)
    sched.policy.fits = {1: sched.policy.fits[1]}  # 'a' prefills on one instance
    sched.add_request(make_request("a", 40, max_tokens=30))
    clock = Clock(sched, predictor).run()
    # 40 prompt + 29 decode tokens need 18 blocks: its instance holds 12, so 'a' grew
    assert len(widened) == 1 and widened[0][0] == "a"
    assert sched.num_preemptions == 0 and len(clock.token_times["a"]) == 30


def _borrow_case(cost):
    """'a' and 'c' decode on the two instances, 1000 tokens in, far from done (the admission
    test then admits 'b' now); the long 'b' arrives."""
    sched, predictor = loong(2, cost, num_blocks=400, max_len=8192, max_num_batched_tokens=256)
    sched.policy.fit(2, 8192, 4)
    sched.policy.fits = {1: sched.policy.fits[1]}  # 'a' and 'c' prefill locally
    clock = Clock(sched, predictor)
    for rid in ("a", "c"):
        sched.add_request(make_request(rid, 5, max_tokens=5000))
        clock.launch()
        clock.finish_next()
    while len(sched.requests["a"].output_token_ids) < 1000:  # long decodes: cheap to pause
        clock.launch()
        clock.finish_next()
    sched.policy.fits = None
    sched.add_request(make_request("b", 200))
    return sched, clock


@pytest.mark.parametrize("cost,borrows", [
    (FakeCostModel(per_token=1e-3, per_pair=1e-4), True),  # SP halves a quadratic prefill
    (FakeCostModel(per_token=1e-3, per_pair=0, per_collective=0.1), False),  # SP is slower
])
def test_decode_instances_are_borrowed_only_when_the_test_passes(cost, borrows):
    sched, clock = _borrow_case(cost)
    while "b" in {r.request_id for r in sched.waiting}:
        clock.launch()
        clock.finish_next()
    (step,) = [s for _, _, s in clock.started
               if "b" in {r.request_id for r in s.scheduler_output.scheduled_requests}]
    (b,) = [r for r in step.scheduler_output.scheduled_requests if r.request_id == "b"]
    assert b.is_sp_prefill == borrows
    assert len(step.instances) == (2 if borrows else 1)


@pytest.mark.parametrize("sp_size,seed", [(2, 0), (2, 13), (4, 1), (4, 2), (3, 3), (5, 4)])
def test_random_workloads_with_aborts_finish_without_leaking_kv(sp_size, seed):
    rng = random.Random(seed)
    # max_model_len within the KV of the whole group, as the engine's start-up check demands
    sched, predictor = loong(sp_size, num_blocks=40, max_num_seqs=6,
                             max_len=min(512, sp_size * 40 * 4))
    arrivals = [(rng.uniform(0, 2.0), make_request(f"r{i}", rng.randint(1, 300),
                                                   rng.randint(1, 40))) for i in range(40)]
    aborts = {rng.uniform(0, 2.0): f"r{i}" for i in rng.sample(range(40), 5)}
    clock = Clock(sched, predictor).run(arrivals, aborts)
    assert {f"r{i}" for i in range(40)} - set(aborts.values()) <= set(clock.first_token_s)
    assert sched.kv_cache_manager.num_free_blocks == 40 * sp_size
    for *_, step in clock.started:
        out = step.scheduler_output.scheduled_requests
        if any(r.is_sp_prefill for r in out):
            assert len(out) == 1  # the workers run an SP prefill alone
    overlapping = [(a, b) for a in clock.started for b in clock.started
                   if a[2].step_id < b[2].step_id and b[0] < a[1] and a[0] < b[1]]
    assert overlapping, "no two steps ever ran at the same time"


def test_an_esp_group_of_several_requests_runs_them_one_sp_step_after_another():
    # only groups of both instances allowed: the DP puts all three prompts in one ESP group;
    # the workers run one SP request at a time, so they prefill one after another on it
    sched, predictor = loong(2, num_blocks=400)
    sched.policy.fit(2, 512, 4)
    sched.policy.fits = {2: sched.policy.fits[2]}
    plan_sizes = []
    head_group = sched.policy.head_group
    sched.policy.head_group = lambda s: (head_group(s), plan_sizes.append(
        len(sched.policy._plan_ids)))[0]
    for rid in ("a", "b", "c"):
        sched.add_request(make_request(rid, 300, max_tokens=2))
    clock = Clock(sched, predictor).run()
    (a,), (b,), (c,) = (sp_steps(clock, rid) for rid in "abc")
    assert a[2].instances == b[2].instances == c[2].instances == (0, 1)
    assert a[1] <= b[0] and b[1] <= c[0]  # one after another, in FCFS order
    assert plan_sizes[:3] == [3, 3, 3]  # planned together, started without planning again
