"""ModelRunner: one iteration on a worker. SchedulerOutput -> this rank's ModelInput -> model
-> logits at the sampling rows -> sampled token ids (a RunnerOutput)."""

from __future__ import annotations

import time

import torch

from csps.contract.step import RunnerOutput, SchedulerOutput
from csps.engine.logprobs import prompt_logprobs
from csps.engine.model_input import ModelInput, prepare_inputs
from csps.engine.sampler import Sampler
from csps.engine.sp_model_input import prepare_sp_inputs


class ModelRunner:
    """sp_rank/sp_size: this rank's place in its SP group (0/1 without sequence parallelism)."""

    def __init__(self, model, kv_caches: list, block_size: int, device: torch.device,
                 sampler: Sampler, sp_rank: int = 0, sp_size: int = 1) -> None:
        self.model = model
        self.kv_caches = kv_caches
        self.block_size = block_size
        self.device = device
        self.sampler = sampler
        self.sp_rank, self.sp_size = sp_rank, sp_size

    def prepare(self, scheduler_output: SchedulerOutput) -> ModelInput | None:
        requests = scheduler_output.scheduled_requests
        if not requests:
            return None
        if any(r.kv_ranges for r in requests):  # placed by an SP-aware scheduler
            return prepare_sp_inputs(requests, self.sp_rank, self.sp_size, self.block_size,
                                     self.device)
        return prepare_inputs(requests, self.block_size, self.device)

    @torch.inference_mode()
    def execute_model(self, scheduler_output: SchedulerOutput) -> RunnerOutput:
        start = time.perf_counter()
        self.sampler.forget(scheduler_output.finished_request_ids)
        model_input = self.prepare(scheduler_output)
        if model_input is None:
            return RunnerOutput(execute_time_s=time.perf_counter() - start)
        hidden = self.model(model_input.input_ids, model_input.positions, self.kv_caches,
                            model_input.metadata)  # [T, H]
        out = RunnerOutput()
        if model_input.samples:
            rows = torch.tensor([row for row, _ in model_input.samples], device=self.device)
            logits = self.model.compute_logits(hidden.index_select(0, rows))  # [N, V] fp32
            sampled = self.sampler.sample(logits, [r for _, r in model_input.samples])
            out.sampled_token_ids, out.failed = sampled.sampled, sampled.failed
            out.logprobs = sampled.logprobs
        for span in model_input.prompt_spans:
            request = span.request
            try:
                out.prompt_logprobs[request.request_id] = prompt_logprobs(
                    self.model, hidden, span.row_start, span.first_position, span.targets,
                    request.sampling_params.prompt_logprobs)
            except (ValueError, IndexError, RuntimeError) as exc:  # this request's alone
                out.failed[request.request_id] = f"prompt logprobs failed: {exc}"
        out.execute_time_s = time.perf_counter() - start
        return out
