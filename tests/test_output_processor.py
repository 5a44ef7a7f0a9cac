"""Stop strings, held-back text and timestamps in the output processor (pure Python)."""

from __future__ import annotations

from csps.engine.output_processor import RequestState, finished_stats, record_token_time
from csps.engine.outputs import IterationStats, RequestMetrics
from csps.request import SamplingParams


class ScriptedDetokenizer:
    """Token id i decodes to PIECES[i]; a piece of None is held back until flush()."""

    PIECES = {1: "Hel", 2: "lo", 3: " wor", 4: "ld", 5: None}

    def __init__(self) -> None:
        self.held = ""

    def add(self, token_id: int) -> str:
        piece = self.PIECES[token_id]
        if piece is None:
            self.held += "\ufffd"
            return ""
        return piece

    def flush(self) -> str:
        held, self.held = self.held, ""
        return held


def make_state(**params) -> RequestState:
    return RequestState("r", "p", [9, 9], SamplingParams(**params), ScriptedDetokenizer(),
                        RequestMetrics(arrival_time=0.0))


def test_stop_string_spanning_tokens_truncates():
    state = make_state(stop=["lo w"])
    deltas = [state.append(t) for t in (1, 2, 3)]
    assert state.text == "Hel" and state.finish_reason == "stop" and state.stop_reason == "lo w"
    assert "".join(deltas) == "Hel"  # what streamed equals the final text


def test_stop_string_kept_when_asked():
    state = make_state(stop=["wor"], include_stop_str_in_output=True)
    for t in (1, 2, 3, 4):
        if state.finish_reason is None:
            state.append(t)
    assert state.text == "Hello wor"


def test_flush_releases_held_back_text():
    state = make_state()
    assert state.append(1) == "Hel" and state.append(5) == ""
    assert state.flush() == "\ufffd" and state.text == "Hel\ufffd"


def test_text_that_may_start_a_stop_string_is_held_until_the_end():
    state = make_state(stop=["xyz"])
    assert [state.append(t) for t in (1, 2, 3, 4)] == ["H", "el", "lo w", "or"]
    assert state.flush() == "ld" and state.text == "Hello world"


def test_timestamps_give_ttft_itl_and_stats():
    state = make_state()
    state.metrics.first_scheduled_time = 0.5
    stats = IterationStats()
    for now, token in ((1.0, 1), (1.25, 2), (1.75, 3)):
        state.append(token)
        record_token_time(state, now, stats)
    state.finish_reason, state.metrics.finished_time = "length", 1.75
    assert stats.ttfts_s == [1.0] and stats.inter_token_latencies_s == [0.25, 0.5]
    done = finished_stats(state)
    assert (done.queue_time_s, done.prefill_time_s, done.decode_time_s) == (0.5, 0.5, 0.75)
    assert done.time_per_output_token_s == 0.375 and done.num_generation_tokens == 3


def test_phases_a_request_never_reached_are_none():
    waiting = make_state()  # aborted while it waited: only its end-to-end latency is known
    waiting.finish_reason, waiting.metrics.finished_time = "abort", 2.0
    done = finished_stats(waiting)
    assert done.finish_reason == "abort" and done.e2e_latency_s == 2.0
    assert (done.queue_time_s, done.prefill_time_s, done.decode_time_s,
            done.time_per_output_token_s) == (None, None, None, None)
    prefilling = make_state()  # failed mid-prefill: it queued, but had no first token
    prefilling.metrics.first_scheduled_time = 0.5
    prefilling.finish_reason, prefilling.metrics.finished_time = "error", 1.5
    done = finished_stats(prefilling)
    assert (done.queue_time_s, done.prefill_time_s, done.decode_time_s) == (0.5, None, None)
