"""StepPredictor: predicted seconds of the iterations a policy considers, priced by a cost model.

A thin layer over csps/costmodel (work.py counts each rank's work, the CostModel prices it) so
the sps2 configurator and the loongserve policy can ask "how long would this take" without
building a SchedulerOutput by hand. No torch (the cost models are pure Python).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from csps.contract.sp_attention import SpAttention
from csps.contract.step import ScheduledRequest, SchedulerOutput
from csps.contract.token_range import TokenRange
from csps.costmodel.load import load_cost_model
from csps.costmodel.shape import ModelShape
from csps.costmodel.work import iteration_work, sp_prefill_work
from csps.request import SamplingParams

if TYPE_CHECKING:
    from csps.config import ParallelConfig
    from csps.costmodel.base import CostModel

_PARAMS = SamplingParams()


class StepPredictor:
    def __init__(self, cost_model: CostModel, shape: ModelShape, parallel: ParallelConfig,
                 block_size: int) -> None:
        self.cost_model = cost_model
        self.shape = shape
        self.parallel = parallel
        self.block_size = block_size

    @property
    def sp_size(self) -> int:
        return self.parallel.sequence_parallel_size

    def sp_prefill_time(self, chunk_lens: Sequence[int], sp_attention: SpAttention | None = None,
                        prefix_lens: Sequence[int] | None = None) -> float:
        """One prompt (or one slice of it) prefilled alone over the ranks with nonzero
        chunk_lens (one length per SP rank, in rank order) with sp_attention (None: the
        deployment's, for the group). prefix_lens: a later slice's earlier tokens held per SP
        rank."""
        return self.cost_model.iteration_time(sp_prefill_work(
            list(chunk_lens), self.shape, self.parallel, sp_attention, prefix_lens=prefix_lens))

    def local_prefill_time(self, chunks: Sequence[tuple[int, int, int]]) -> float:
        """Prompt chunks each run whole on one rank: (rank, num_new_tokens, num_computed)."""
        requests = [_scheduled(f"p{i}", rank, n, cached, cached + n)
                    for i, (rank, n, cached) in enumerate(chunks)]
        return self.iteration_time(SchedulerOutput(0, requests))

    def decode_time(self, decodes: Sequence[tuple[int, int]]) -> float:
        """One decode step of requests given as (leader, context_len), KV on the leader."""
        requests = [_scheduled(f"d{i}", rank, 1, n - 1, n)
                    for i, (rank, n) in enumerate(decodes)]
        return self.iteration_time(SchedulerOutput(0, requests))

    def iteration_time(self, output: SchedulerOutput) -> float:
        """Seconds of a whole iteration (SP prefills priced with their own choices)."""
        return self.cost_model.iteration_time(
            iteration_work(output, self.shape, self.parallel, self.block_size))


def _scheduled(request_id: str, rank: int, num_new: int, cached: int,
               total: int) -> ScheduledRequest:
    """A stand-in request whose whole KV (total tokens) lives on `rank`, which leads it."""
    return ScheduledRequest(request_id, [0] * num_new, cached, [], _PARAMS, do_sample=True,
                            kv_ranges=(TokenRange(rank, 0, total, ()),), leader=rank)


BUNDLED_PROFILE = Path(__file__).resolve().parent.parent / "costmodel" / "profiles" / \
    "cpu-smollm2-135m-sp2.json"


def build_predictor(cost_model_path: str, model_dir: str | Path, parallel: ParallelConfig,
                    block_size: int, dtype: str, policy: str = "sps2") -> StepPredictor | None:
    """The engine's predictor: the cost model at cost_model_path, the model's config.json and
    the engine's ParallelConfig; None for "none". "" means: none for sps2 (its threshold rule,
    predictable on any model and machine), the bundled CPU profile for loongserve, which cannot
    schedule without one (None if the profile is absent: loongserve then refuses to start).
    dtype: the resolved activation dtype name (float32 -> 4 bytes, else 2)."""
    if cost_model_path == "none" or (not cost_model_path and policy != "loongserve"):
        return None
    path = Path(cost_model_path) if cost_model_path else BUNDLED_PROFILE
    if not cost_model_path and not path.exists():
        return None
    shape = ModelShape.from_config_file(Path(model_dir) / "config.json",
                                        dtype_bytes=4 if dtype == "float32" else 2)
    return StepPredictor(load_cost_model(path), shape, parallel, block_size)
