"""Frozen engine configuration: model, cache, scheduler and parallel settings. No torch.

Each field carries its help text in `metadata`, from which the CLI builds its flags, so there is
one source of truth. Discoveries made at start-up (the model's context length, how many KV blocks
fit) are returned by the code that finds them, never written back into a config.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

SCHEDULER_POLICIES = ("auto", "sarathi", "vllm", "sps2", "loongserve")
SP_ATTENTION_ALGORITHMS = ("ulysses", "allgather_kv", "ring", "csa")
CSA_FAR_QUERIES = ("all", "sampled")
SP_DECODE_MODES = ("qmove", "kvmove")
DTYPES = ("auto", "float32", "bfloat16", "float16")
QUANTIZATIONS = ("none", "int8")  # layers/quantization.py (config stays torch-free)
# a single rank's attention (SP ranks use --sp-attention)
ATTENTION_BACKENDS = ("paged", "paged_torch", "reference")


def _help(text: str) -> dict:
    return {"help": text}


@dataclass(frozen=True)
class ModelConfig:
    model: str = field(default="smollm2-135m", metadata=_help(
        "Model name (smollm2-135m), a Hugging Face folder, or a .gguf file."))
    served_model_name: str | None = field(default=None, metadata=_help(
        "Name reported by /v1/models and required in requests (default: the model argument)."))
    dtype: str = field(default="auto", metadata=_help(
        "Weight and activation dtype: auto (float32 on CPU, bfloat16 on CUDA), float32, "
        "bfloat16, float16."))
    quantization: str = field(default="none", metadata=_help(
        "Weights: none, or int8 (weight-only, per-row scales; use with --dtype bfloat16, whose "
        "activations the fused CPU kernel needs)."))
    attention_backend: str = field(default="paged", metadata=_help(
        "Attention of a single-rank worker: paged (reads the KV cache in place; fp32 decodes on "
        "CPU through a compiled kernel built on first use), paged_torch (the same in place, "
        "torch ops only) or reference (gathers each request's blocks first; the oracle)."))
    max_model_len: int | None = field(default=None, metadata=_help(
        "Longest prompt plus output, in tokens (default: the model's max_position_embeddings)."))
    device: str = field(default="auto", metadata=_help("auto, cpu or cuda."))
    seed: int = field(default=0, metadata=_help("Seed for weights-free randomness (sampling)."))

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {DTYPES}, got {self.dtype!r}")
        if self.quantization not in QUANTIZATIONS:
            raise ValueError(f"quantization must be one of {QUANTIZATIONS}, "
                             f"got {self.quantization!r}")
        if self.attention_backend not in ATTENTION_BACKENDS:
            raise ValueError(f"attention_backend must be one of {ATTENTION_BACKENDS}, "
                             f"got {self.attention_backend!r}")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ValueError(f"device must be auto, cpu or cuda, got {self.device!r}")
        if self.max_model_len is not None and self.max_model_len < 1:
            raise ValueError(f"max_model_len must be positive, got {self.max_model_len}")

    @property
    def name(self) -> str:
        return self.served_model_name or self.model


@dataclass(frozen=True)
class CacheConfig:
    block_size: int = field(default=16, metadata=_help("Tokens per KV cache block."))
    kv_cache_memory_bytes: int = field(default=2 << 30, metadata=_help(
        "Memory for the KV cache of each worker, in bytes (suffixes K, M, G accepted)."))
    enable_prefix_caching: bool = field(default=True, metadata=_help(
        "Reuse the KV of prompt prefixes already computed (automatic prefix caching, on "
        "every SP rank); --no-enable-prefix-caching turns it off."))

    def __post_init__(self) -> None:
        if self.block_size < 1:
            raise ValueError(f"block_size must be positive, got {self.block_size}")
        if self.kv_cache_memory_bytes < 1:
            raise ValueError("kv_cache_memory_bytes must be positive")


@dataclass(frozen=True)
class SchedulerConfig:
    policy: str = field(default="auto", metadata=_help(
        "Scheduling policy: sarathi (chunked prefill, stall-free batching), vllm "
        "(prefill-first, no chunking), sps2 (long prompts prefill with sequence parallelism, "
        "decode moves the query) or loongserve (elastic sequence parallelism: SP degree per "
        "iteration, ring prefill with scale-down, multi-master decode); auto: sarathi on one "
        "SP rank, sps2 on several."))
    max_num_batched_tokens: int | None = field(default=None, metadata=_help(
        "Token budget per iteration (default: 512 for sarathi, max_model_len for vllm)."))
    max_num_seqs: int = field(default=256, metadata=_help("Most requests running at once."))
    max_waiting_requests: int = field(default=1024, metadata=_help(
        "Most requests queued; past this the server answers 503."))
    long_prompt_threshold: int = field(default=1024, metadata=_help(
        "sps2: prompts of at least this many tokens prefill over the whole SP group; shorter "
        "ones prefill in chunks on one rank."))
    hybrid_batching: bool = field(default=False, metadata=_help(
        "sps2: let prefill chunks ride in decode iterations (Sarathi-style hybrid batching) "
        "instead of alternating separate prefill and decode iterations."))
    sp_prefill_chunk: int = field(default=512, metadata=_help(
        "sps2: tokens per rank of one slice of a chunked SP prefill (rounded down to whole "
        "blocks); each slice is one step of its SP group, carrying the group's decodes, so a "
        "decode waits at most one slice. 0: prefill a long prompt whole in one step."))
    slo_tbt: float | None = field(default=None, metadata=_help(
        "sps2 with a cost model: seconds a step may take; the configurator picks the SP degree "
        "and slice size with the least predicted TTFT whose predicted step time stays under "
        "it (unset: --sp-prefill-chunk)."))
    consolidate_decode_kv: float = field(default=0.0, metadata=_help(
        "sps2 on per-instance steps: after an SP prefill, move the request's KV onto one rank "
        "of its group (the least loaded with room for it and its output), so its decodes run "
        "there alone; and give a long prompt a group of instances no decode uses when its "
        "predicted TTFT is at most this factor times the best group's (decodes then never ride "
        "in its slices). 0: off (KV stays where the prefill wrote it; groups by TTFT alone)."))
    lockstep: bool = field(default=False, metadata=_help(
        "sps2 and loongserve: run one step over all SP ranks at a time (the engine before "
        "per-instance steps: SP prefills whole and alone, decode iterations between), for "
        "comparison."))
    cost_model: str = field(default="", metadata=_help(
        "Cost-model JSON (from `csps profile`) the sps2 configurator and loongserve price "
        "iterations with; empty: none for sps2 (its --long-prompt-threshold rule), the bundled "
        "CPU profile of smollm2-135m for loongserve; 'none': no cost model."))
    sps2_csa_candidates: str = field(default="", metadata=_help(
        "sps2 with a cost model: ';'-separated CSA level strings to choose from per request, "
        "P standing for the chosen SP degree (e.g. '1:1,P:2;1:1,P:4'); empty: the engine's."))
    sps2_micro_batch_candidates: str = field(default="", metadata=_help(
        "sps2 with a cost model: ';'-separated CSA micro-batches HEADSxTOKENS to choose from "
        "per request ('none' = no pipelining); empty: the engine's --csa-micro-batch."))
    sp_prefill_degrees: str = field(default="", metadata=_help(
        "sps2 with a cost model: comma-separated SP degrees the configurator may give a long "
        "prompt (e.g. '2,4'); empty: any from 1 to the SP size."))
    loongserve_sp_batch: int = field(default=0, metadata=_help(
        "loongserve: most requests the batching DP puts in one multi-rank ESP group (0 = no "
        "limit). A worker's SP forward runs one request: on per-instance steps the group runs "
        "its requests one SP step after another; with --lockstep only the head's starts."))

    @property
    def allowed_sp_degrees(self) -> tuple[int, ...]:
        """sp_prefill_degrees parsed (empty: the policy's default); ValueError if not ints."""
        try:
            return tuple(int(d) for d in self.sp_prefill_degrees.split(",") if d.strip())
        except ValueError as err:
            raise ValueError(f"sp_prefill_degrees must be comma-separated integers, got "
                             f"{self.sp_prefill_degrees!r}") from err

    def __post_init__(self) -> None:
        if self.policy not in SCHEDULER_POLICIES:
            raise ValueError(f"policy must be one of {SCHEDULER_POLICIES}, got {self.policy!r}")
        if self.max_num_batched_tokens is not None and self.max_num_batched_tokens < 1:
            raise ValueError("max_num_batched_tokens must be positive")
        if self.max_num_seqs < 1:
            raise ValueError("max_num_seqs must be positive")
        if self.max_waiting_requests < 1:
            raise ValueError("max_waiting_requests must be positive")
        if self.long_prompt_threshold < 1:
            raise ValueError("long_prompt_threshold must be positive")
        if self.sp_prefill_chunk < 0:
            raise ValueError("sp_prefill_chunk must be >= 0 (0: whole prompts)")
        if self.consolidate_decode_kv and not self.consolidate_decode_kv >= 1:
            raise ValueError(f"consolidate_decode_kv must be 0 (off) or a factor >= 1, got "
                             f"{self.consolidate_decode_kv}")
        if self.consolidate_decode_kv and self.lockstep:
            raise ValueError("consolidate_decode_kv moves KV in per-instance steps; it cannot "
                             "be combined with lockstep")
        if self.slo_tbt is not None and not self.slo_tbt > 0:
            raise ValueError(f"slo_tbt must be a positive number of seconds, got {self.slo_tbt}")
        if any(d < 1 for d in self.allowed_sp_degrees):
            raise ValueError(f"sp_prefill_degrees must list positive degrees, got "
                             f"{self.sp_prefill_degrees!r}")
        if self.loongserve_sp_batch < 0:
            raise ValueError("loongserve_sp_batch must be >= 0")
        for text in (self.sps2_csa_candidates, self.sps2_micro_batch_candidates):
            if text and not all(c.strip() for c in text.split(";")):
                raise ValueError(f"empty candidate in {text!r}")

    def token_budget(self, max_model_len: int) -> int:
        """The per-iteration token budget once the context length is known."""
        if self.max_num_batched_tokens is not None:
            return self.max_num_batched_tokens
        return max_model_len if self.policy in ("vllm", "loongserve") else 512


@dataclass(frozen=True)
class ParallelConfig:
    sequence_parallel_size: int = field(default=1, metadata=_help(
        "Workers a long prompt's prefill is split over (vLLM's -pcp / -dcp)."))
    tensor_parallel_size: int = field(default=1, metadata=_help("Tensor-parallel workers."))
    sp_attention: str = field(default="ulysses", metadata=_help(
        "Exact SP prefill attention: ulysses (all-to-all, heads split by KV group), "
        "allgather_kv (partial Q, all-gathered KV) or ring (pass-KV); csa: sparse "
        "(Communication-efficient Sparse Attention, levels from --csa-levels)."))
    csa_levels: str = field(default="", metadata=_help(
        "CSA levels as group_size:stride pairs, e.g. 1:1,2:4,4:8 (level 0 dense on the "
        "worker's own chunk; the top group must be the SP size). Default 1:1,P:2, chosen from "
        "the accuracy measurements in docs/benchmarks.md."))
    csa_far_queries: str = field(default="all", metadata=_help(
        "CSA at far levels: all (every local query against the sampled K/V) or sampled "
        "(only sampled queries travel to the keys, as in the authors' prototype)."))
    csa_micro_batch: str = field(default="", metadata=_help(
        "CSA three-phase pipelining: HEADSxTOKENS micro-batches (KV heads x travelling rows per "
        "head and sender), e.g. 1x512; empty: no pipelining."))
    sp_decode: str = field(default="qmove", metadata=_help(
        "Decode over KV spread across SP ranks: qmove (the query goes to the KV) or kvmove "
        "(the KV is gathered to the leader every step; for comparison)."))

    def __post_init__(self) -> None:
        if self.sequence_parallel_size < 1 or self.tensor_parallel_size < 1:
            raise ValueError("parallel sizes must be positive")
        if self.sp_attention not in SP_ATTENTION_ALGORITHMS:
            raise ValueError(f"sp_attention must be one of {SP_ATTENTION_ALGORITHMS}, "
                             f"got {self.sp_attention!r}")
        if self.sp_attention == "csa":
            self.sp_attention_choice.csa.check_sp_size(self.sequence_parallel_size)
        if self.sp_decode not in SP_DECODE_MODES:
            raise ValueError(f"sp_decode must be one of {SP_DECODE_MODES}, "
                             f"got {self.sp_decode!r}")

    @property
    def world_size(self) -> int:
        return self.sequence_parallel_size * self.tensor_parallel_size

    @property
    def resolved_csa_levels(self) -> str:
        """--csa-levels, or the default: one far level over the SP group at stride 2."""
        return self.csa_levels or f"1:1,{self.sequence_parallel_size}:2"

    @property
    def sp_attention_choice(self):
        """The deployment's SP attention as the typed value the scheduler puts on every SP
        prefill it decides (contract/sp_attention.py; pure Python)."""
        from csps.contract.sp_attention import SpAttention

        return SpAttention.parse(self.sp_attention, self.resolved_csa_levels,
                                 self.csa_far_queries, self.csa_micro_batch)


@dataclass(frozen=True)
class ObservabilityConfig:
    step_trace: str | None = field(default=None, metadata=_help(
        "Write one JSON line per executed step (its instances, start and end time, each "
        "request's computed and scheduled tokens and KV placement) to this file; `csps "
        "simulate` writes the same lines for its simulated steps "
        "(benchmarks/step_trace_compare.py prices a real trace with the cost model)."))


@dataclass(frozen=True)
class EngineConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    observability: ObservabilityConfig = field(default_factory=ObservabilityConfig)

    def __post_init__(self) -> None:
        """Resolve policy "auto" and refuse a policy that cannot drive the SP group. loongserve
        prefills with ring attention (its KV passes every rank, which scale-down needs): the
        default ulysses becomes ring; allgather_kv and csa are refused."""
        sp_size = self.parallel.sequence_parallel_size
        if self.scheduler.policy == "auto":
            policy = "sps2" if sp_size > 1 else "sarathi"
            object.__setattr__(self, "scheduler", dataclasses.replace(self.scheduler,
                                                                      policy=policy))
        if sp_size > 1 and self.scheduler.policy not in ("sps2", "loongserve"):
            raise ValueError(f"policy {self.scheduler.policy!r} runs each request on one "
                             f"worker; with sequence_parallel_size {sp_size} use sps2 or "
                             f"loongserve")
        if self.scheduler.policy == "loongserve" and self.parallel.sp_attention != "ring":
            if self.parallel.sp_attention != "ulysses":
                raise ValueError(f"loongserve prefills with ring attention (scale-down keeps "
                                 f"KV as it passes each rank); sp_attention "
                                 f"{self.parallel.sp_attention!r} cannot")
            object.__setattr__(self, "parallel", dataclasses.replace(self.parallel,
                                                                     sp_attention="ring"))

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def parse_bytes(text: str | int) -> int:
    """'2G' -> 2147483648; plain integers pass through. Raises ValueError on junk."""
    if isinstance(text, int):
        return text
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
    s = text.strip().upper().removesuffix("IB").removesuffix("B")
    try:
        if s and s[-1] in units:
            return int(float(s[:-1]) * units[s[-1]])
        return int(s)
    except ValueError:
        raise ValueError(f"not a byte size: {text!r}") from None


# Flat keyword names (the offline API's and the CLI's) that differ from the field names.
_ALIASES = {"scheduler": "policy"}


def engine_config_from_kwargs(**kwargs) -> EngineConfig:
    """Build an EngineConfig from flat keywords, e.g. LLM(model=..., max_num_seqs=8).
    Unknown keywords raise ValueError naming them."""
    groups = {"model": ModelConfig, "cache": CacheConfig, "scheduler": SchedulerConfig,
              "parallel": ParallelConfig}
    values: dict[str, dict] = {name: {} for name in groups}
    for key, value in kwargs.items():
        field_name = _ALIASES.get(key, key)
        for group, cls in groups.items():
            if field_name in {f.name for f in dataclasses.fields(cls)}:
                values[group][field_name] = value
                break
        else:
            raise ValueError(f"unknown engine argument {key!r}")
    return EngineConfig(**{group: groups[group](**values[group]) for group in groups})
