"""--step-trace lines read back as the steps that were run (pure Python): every field the cost
model reads survives the round trip, CSA choices included; the engine's and the simulator's
traces are checked against their recorded decisions in test_sim_engine_decisions.py."""

from __future__ import annotations

from csps.contract.sp_attention import SpAttention
from csps.contract.step import KvMove, ScheduledRequest, SchedulerOutput, Step
from csps.contract.step_trace import StepTraceWriter, read_step_trace
from csps.contract.token_range import TokenRange
from csps.request import SamplingParams


def _step() -> Step:
    sp_prefill = ScheduledRequest(
        "long", list(range(96)), 32, list(range(8)), SamplingParams(), False,
        kv_ranges=(TokenRange(0, 0, 80, (1, 2, 3, 4, 5)), TokenRange(1, 80, 128, (7, 8, 9))),
        leader=1, sp_chunk_lens=(48, 48),
        sp_attention=SpAttention.parse("csa", "1:1,2:4", "sampled", "2x64"))
    decode = ScheduledRequest("short", [5], 40, [11, 12, 13], SamplingParams(), True,
                              kv_ranges=(TokenRange(1, 0, 41, (11, 12, 13)),), leader=1)
    move = KvMove("long", TokenRange(0, 0, 80, (1, 2, 3, 4, 5)),
                  TokenRange(1, 0, 80, (20, 21, 22, 23, 24)))
    return Step(7, (0, 1), SchedulerOutput(3, [decode, sp_prefill], kv_moves=[move]))


def _cost_fields(r: ScheduledRequest) -> tuple:
    return (r.request_id, len(r.token_ids), r.num_computed_tokens, len(r.block_ids),
            r.do_sample, r.leader, r.sp_chunk_lens, r.sp_attention,
            tuple((t.rank, t.start, t.end, len(t.block_ids)) for t in r.kv_ranges))


def test_a_traced_step_reads_back_as_it_ran(tmp_path):
    path = tmp_path / "steps.jsonl"
    writer = StepTraceWriter(path)
    step = _step()
    other = Step(8, (1,), SchedulerOutput(4, []))
    writer.started(step, 1.25)
    writer.started(other, 1.5, replica=2)
    writer.finished(other, 1.75, replica=2)  # lines come in the order steps finish
    writer.finished(step, 3.0)
    writer.close()
    first, second = read_step_trace(path)
    assert (first.step_id, first.replica, first.instances) == (8, 2, (1,))
    assert (second.step_id, second.instances, second.start_s, second.end_s) == (7, (0, 1),
                                                                                 1.25, 3.0)
    assert second.seconds == 1.75
    assert second.scheduler_output.iteration == 3
    ran = [_cost_fields(r) for r in step.scheduler_output.scheduled_requests]
    assert [_cost_fields(r) for r in second.scheduler_output.scheduled_requests] == ran
    assert first.scheduler_output.kv_moves == []
    assert [(m.request_id, m.src.rank, m.dst.rank, m.src.start, m.src.end, len(m.dst.block_ids))
            for m in second.scheduler_output.kv_moves] == [("long", 0, 1, 0, 80, 5)]
    prefill = second.scheduler_output.scheduled_requests[1]
    assert prefill.is_sp_prefill and prefill.sp_attention.csa.micro_batch_tokens == 64
