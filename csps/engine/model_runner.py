"""ModelRunner: one iteration on a worker. SchedulerOutput -> flat tensors + AttentionMetadata ->
model -> logits at the sampling positions -> sampled token ids (a RunnerOutput)."""

from __future__ import annotations

import time

import torch

from csps.attention.metadata import AttentionMetadata
from csps.engine.sampler import Sampler
from csps.scheduler.output import RunnerOutput, SchedulerOutput


class ModelRunner:
    def __init__(self, model, kv_caches: list, block_size: int, device: torch.device,
                 sampler: Sampler) -> None:
        self.model = model
        self.kv_caches = kv_caches
        self.block_size = block_size
        self.device = device
        self.sampler = sampler

    @torch.inference_mode()
    def execute_model(self, scheduler_output: SchedulerOutput) -> RunnerOutput:
        start = time.perf_counter()
        self.sampler.forget(scheduler_output.finished_request_ids)
        requests = scheduler_output.scheduled_requests
        if not requests:
            return RunnerOutput()
        input_ids: list[int] = []
        positions: list[int] = []
        sample_rows: list[int] = []  # flat index of the last token of each sampling request
        for r in requests:
            input_ids.extend(r.token_ids)
            positions.extend(range(r.num_computed_tokens,
                                   r.num_computed_tokens + r.num_scheduled_tokens))
            if r.do_sample:
                sample_rows.append(len(input_ids) - 1)
        metadata = AttentionMetadata.build(
            [(r.num_computed_tokens, r.num_scheduled_tokens, r.block_ids) for r in requests],
            block_size=self.block_size, device=self.device)
        input_tensor = torch.tensor(input_ids, dtype=torch.long, device=self.device)  # [T]
        position_tensor = torch.tensor(positions, dtype=torch.long, device=self.device)  # [T]
        hidden = self.model(input_tensor, position_tensor, self.kv_caches, metadata)  # [T, H]
        sampled: dict[str, int] = {}
        if sample_rows:
            rows = torch.tensor(sample_rows, device=self.device)
            logits = self.model.compute_logits(hidden.index_select(0, rows))  # [N, V] fp32
            samplers = [r for r in requests if r.do_sample]
            token_ids = self.sampler.sample(logits, [r.request_id for r in samplers],
                                            [r.sampling_params for r in samplers])
            sampled = {r.request_id: t for r, t in zip(samplers, token_ids, strict=True)}
        return RunnerOutput(sampled_token_ids=sampled,
                            execute_time_s=time.perf_counter() - start)
