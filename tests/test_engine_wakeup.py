"""The engine's loop wakes for a request that arrives while steps are in flight (fake executor,
tiny model, no worker processes): step() returns without a finished step once the Wakeup is
set, and the next step() starts the newcomer on the instance the step in flight left idle, as
the simulator does. Without a Wakeup, step() keeps waiting for a step to end."""

from __future__ import annotations

import threading
import time
from multiprocessing.connection import wait

from csps.config import CacheConfig, EngineConfig, ModelConfig, ParallelConfig, SchedulerConfig
from csps.contract.step import RunnerOutput
from csps.engine.llm_engine import LLMEngine
from csps.engine.wakeup import Wakeup
from csps.request import SamplingParams


class HeldExecutor:
    """Holds every submitted step until release(); wait_steps returns released steps, or
    nothing once `wake` is set."""

    def __init__(self) -> None:
        self.in_flight: list = []
        self.submitted: list = []  # every step, in submit order
        self._released = threading.Event()

    def submit(self, step) -> None:
        self.in_flight.append(step)
        self.submitted.append(step)

    def release(self) -> None:
        self._released.set()

    def wait_steps(self, timeout_s=None, wake=None):
        deadline = time.monotonic() + 10
        while not self._released.is_set():
            assert time.monotonic() < deadline, "neither released nor woken"
            if wake is not None and wait([wake.waitable], 0.01):
                return []
            self._released.wait(0.01)
        done, self.in_flight = self.in_flight, []
        return [(s, RunnerOutput({r.request_id: 7 for r in s.scheduler_output.scheduled_requests
                                  if r.do_sample})) for s in done]

    def check_health(self) -> None:
        pass

    def shutdown(self) -> None:
        pass


def _engine(model_dir) -> tuple[LLMEngine, HeldExecutor]:
    executor = HeldExecutor()
    config = EngineConfig(
        model=ModelConfig(model=str(model_dir), max_model_len=256, dtype="float32"),
        cache=CacheConfig(kv_cache_memory_bytes=1 << 22),
        scheduler=SchedulerConfig(policy="sps2", lockstep=False, long_prompt_threshold=128),
        parallel=ParallelConfig(sequence_parallel_size=2))
    return LLMEngine(config, executor_factory=lambda cfg, kwargs: executor), executor


PARAMS = SamplingParams(temperature=0.0, max_tokens=2, ignore_eos=True)


def test_an_arrival_wakes_the_loop_and_starts_on_the_idle_instance(tiny_engine_dir):
    engine, executor = _engine(tiny_engine_dir)
    engine.wake = Wakeup()
    engine.add_request("first", None, list(range(3, 40)), PARAMS)
    threading.Timer(0.2, engine.wake.set).start()  # a request arrives at the server
    outputs, _ = engine.step()  # returns on the wake: the first step is still in flight
    assert outputs == [] and len(executor.in_flight) == 1
    engine.wake.clear()
    engine.add_request("second", None, list(range(50, 70)), PARAMS)  # the loop applies it
    threading.Timer(0.2, executor.release).start()
    outputs, _ = engine.step()  # starts the second beside the first, then both finish
    first, second = executor.submitted
    assert [r.request_id for r in second.scheduler_output.scheduled_requests] == ["second"]
    assert not set(first.instances) & set(second.instances)  # on the idle instance
    assert sorted(o.request_id for o in outputs) == ["first", "second"]
    engine.wake.close()


def test_without_a_wakeup_step_waits_for_a_step_to_end(tiny_engine_dir):
    engine, executor = _engine(tiny_engine_dir)
    engine.add_request("first", None, list(range(3, 40)), PARAMS)
    timer = threading.Timer(0.3, executor.release)
    timer.start()
    outputs, _ = engine.step()
    assert [o.request_id for o in outputs] == ["first"]  # it returned only once released
