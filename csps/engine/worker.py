"""Worker: owns the model weights, the paged KV tensors and the ModelRunner of one rank."""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from csps.contract.csa_config import CsaConfig
from csps.contract.step import RunnerOutput, SchedulerOutput, Step
from csps.engine.grammar_book import GrammarBook
from csps.engine.model_runner import ModelRunner
from csps.engine.sampler import Sampler
from csps.engine.step_view import local_output
from csps.kvcache.paged_cache import allocate_kv_caches
from csps.model.loader import load_model
from csps.parallel.comm import CommStats
from csps.parallel.kv_transfer import move_kv_blocks

if TYPE_CHECKING:
    from csps.parallel.groups import ParallelGroups

TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(name: str) -> str:
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("device=cuda requested but CUDA is not available")
    return name


def resolve_dtype(name: str, device: str) -> str:
    if name == "auto":
        return "bfloat16" if device == "cuda" else "float32"
    return name


class Worker:
    """One rank's model and KV cache. `groups` is this rank's place in the SP x TP grid (None in
    a single-process engine); the executor calls its methods (see worker_proc.WORKER_METHODS)."""

    def __init__(self, model_dir: Path, arch, dtype: str, device: str, num_blocks: int,
                 block_size: int, seed: int, groups: ParallelGroups | None = None,
                 sp_attention: str = "ulysses", sp_decode: str = "qmove",
                 csa_levels: str = "1:1,2:2", csa_far_queries: str = "all",
                 csa_micro_batch: str = "", attention_backend: str = "paged",
                 quantization: str = "none") -> None:
        torch.manual_seed(seed)
        self.groups = groups
        self.device = torch.device(device)
        self.comm_stats = CommStats()
        backend = tp = None
        # KV moves' communicators: one per contiguous step group, and the bound step's
        self._transfer_comms, self._transfer = {}, None
        if groups is not None:
            from csps.parallel.worker_context import make_parallel_context, make_transfer_comms

            self._transfer_comms = make_transfer_comms(groups, self.comm_stats)

            csa = (CsaConfig.parse(csa_levels, csa_far_queries, csa_micro_batch)
                   if sp_attention == "csa" else None)
            backend, tp = make_parallel_context(groups, sp_attention, self.comm_stats,
                                                sp_decode, csa)
        self.backend = backend
        self.model = load_model(model_dir, dtype=TORCH_DTYPES[dtype], device=self.device,
                                attn_backend_name=attention_backend, attn_backend=backend,
                                tp=tp, quantization=quantization)
        kv_caches = allocate_kv_caches(
            num_layers=arch.num_hidden_layers, num_blocks=num_blocks, block_size=block_size,
            num_kv_heads=self.model.model.layers[0].self_attn.num_kv_heads,  # this TP rank's
            head_dim=arch.head_dim, dtype=TORCH_DTYPES[dtype], device=self.device)
        sp_rank, sp_size = (0, 1) if groups is None else (groups.sp_rank, groups.sp_size)
        sampler = Sampler(seed, grammars=GrammarBook(model_dir, arch.vocab_size))
        self.kv_caches = kv_caches
        self.runner = ModelRunner(self.model, kv_caches, block_size, self.device, sampler,
                                  sp_rank=sp_rank, sp_size=sp_size)

    def execute_step(self, step: Step) -> RunnerOutput:
        """Run a step of this rank's instances on their process group (ranks in the step
        counted from its first instance; engine/step_view.py)."""
        if self.groups is None:
            if step.instances != (0,):
                raise ValueError(f"a single-process worker runs instance 0, got {step.instances}")
            return self.execute_model(step.scheduler_output)
        first, size = step.instances[0], len(step.instances)
        if not first <= self.groups.sp_rank < first + size:
            raise ValueError(f"SP rank {self.groups.sp_rank} got a step of {step.instances}")
        self.backend.bind(first, size)
        self._transfer = self._transfer_comms[(first, size)]
        self.runner.sp_rank, self.runner.sp_size = self.groups.sp_rank - first, size
        return self.execute_model(local_output(step))

    def execute_model(self, scheduler_output: SchedulerOutput) -> RunnerOutput:
        """The forward (and sampling) of one step, then its KV moves."""
        before = dict(self.comm_stats.bytes_sent)
        output = self.runner.execute_model(scheduler_output)
        if scheduler_output.kv_moves:
            if self._transfer is None:
                raise ValueError("KV moves need an SP group (this worker runs alone)")
            start = time.perf_counter()
            move_kv_blocks(self._transfer, self.kv_caches, scheduler_output.kv_moves)
            output.execute_time_s += time.perf_counter() - start
        output.comm_bytes = {phase: n - before[phase] for phase, n
                             in self.comm_stats.bytes_sent.items() if n > before[phase]}
        return output
