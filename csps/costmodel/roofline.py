"""RooflineCostModel: a GPU iteration priced from peak rates (hardware.py) and the model's shape.

Per rank (one TP member of one SP rank, as `work.iteration_work` counts it):
- dense layers: max(FLOPs / (peak * mfu), bytes / (bandwidth * mbu)), the bytes being this
  member's 1/T of the weights (read once per iteration when it runs any token) plus the
  activations its tokens read and write;
- prefill attention: attn_pairs * attn_flops_per_pair / (peak * attn_mfu) (compute bound);
- decode attention: decode_kv_tokens KV positions read from HBM (counted in all-KV-head units,
  already scaled to this member's heads by work.py);
- communication: each phase's bytes over the link its group crosses (`tp` inside the TP group;
  `prefill_attn`, `decode_attn`, `control` over the SP x TP world), the share sent to other nodes
  at the inter-node rate, plus latency per collective; `overlappable_bytes` hide behind compute.
The iteration lasts as long as the slowest rank plus a fixed overhead (launches, scheduling).
JSON: {"kind": "roofline", "cluster": NAME_OR_DICT, "model": NAME_OR_PATH, "tp": T, "sp": P,
"dtype": "bfloat16", "iteration_overhead_s": S}. No torch.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property

from csps.costmodel.base import RankWork
from csps.costmodel.hardware import ClusterSpec
from csps.costmodel.shape import ModelShape

DTYPE_BYTES = {"bfloat16": 2, "float16": 2, "float32": 4}
# Phases whose collectives span the SP x TP world; "tp" stays inside a TP group.
WORLD_PHASES = ("prefill_attn", "decode_attn", "control", "kv_transfer")


@dataclass(frozen=True, slots=True)
class _Rates:
    token_flops_s: float
    sampled_flops_s: float
    weights_s: float
    token_bytes_s: float
    pair_s: float
    kv_token_s: float
    world_byte_s: float
    tp_byte_s: float
    world_latency_s: float
    tp_latency_s: float


@dataclass(frozen=True)
class RooflineCostModel:
    cluster: ClusterSpec
    shape: ModelShape
    tp: int = 1  # tensor-parallel members per SP rank
    sp: int = 1  # SP ranks (the SP x TP world decides which link its collectives cross)
    iteration_overhead_s: float = 1e-3  # per iteration: scheduling, launches, sampling sync
    name: str = "roofline"

    def __post_init__(self) -> None:
        if self.tp < 1 or self.sp < 1:
            raise ValueError(f"tp and sp must be positive, got tp={self.tp} sp={self.sp}")
        if self.tp * self.sp > self.cluster.num_gpus:
            raise ValueError(f"sp x tp = {self.sp * self.tp} ranks exceed the cluster's "
                             f"{self.cluster.num_gpus} GPUs")
        if self.iteration_overhead_s < 0:
            raise ValueError("iteration_overhead_s must be >= 0")

    # ---- per-member sizes ---------------------------------------------------------------
    @property
    def kv_heads_per_member(self) -> int:
        """KV heads one TP member holds (split evenly; replicated when there are fewer)."""
        return max(1, -(-self.shape.num_kv_heads // self.tp))

    @property
    def weight_bytes_per_member(self) -> int:
        return self.shape.weight_bytes // self.tp

    @property
    def kv_bytes_per_token_per_member(self) -> int:
        return self.shape.kv_bytes_per_token * self.kv_heads_per_member // self.shape.num_kv_heads

    @property
    def activation_bytes_per_token(self) -> int:
        """Inputs read and outputs written by one token's projections and MLP, all layers."""
        s = self.shape
        per_layer = 3 * s.hidden_size + 2 * s.q_width + 2 * s.kv_width + 3 * s.intermediate_size
        return per_layer * s.dtype_bytes * s.num_layers

    # ---- the CostModel protocol ---------------------------------------------------------
    @cached_property
    def _rates(self) -> _Rates:
        """Seconds per unit of each count (the roofline's divisions, done once)."""
        gpu, s = self.cluster.gpu, self.shape
        flop_s = 1.0 / (gpu.peak_flops * gpu.mfu)
        byte_s = 1.0 / (gpu.hbm_bandwidth * gpu.mbu)
        world = self.sp * self.tp
        return _Rates(
            token_flops_s=s.linear_flops_per_token * flop_s,
            sampled_flops_s=s.lm_head_flops / self.tp * flop_s,
            weights_s=self.weight_bytes_per_member * byte_s,
            token_bytes_s=self.activation_bytes_per_token * byte_s,
            pair_s=s.attn_flops_per_pair / (gpu.peak_flops * gpu.attn_mfu),
            kv_token_s=s.kv_bytes_per_token * byte_s,  # decode_kv_tokens: full-KV-head units
            world_byte_s=self._byte_time(world), tp_byte_s=self._byte_time(self.tp),
            world_latency_s=self.cluster.link_for(world).latency_s,
            tp_latency_s=self.cluster.link_for(self.tp).latency_s)

    def _byte_time(self, group_size: int) -> float:
        """Seconds per byte a rank sends spread evenly over a group of consecutive ranks: the
        share bound for other nodes goes over the inter-node link while the rest uses the
        intra-node link, at the same time."""
        cluster = self.cluster
        intra = cluster.intra_node_link.transfer_time(1.0, 0)
        if group_size <= cluster.gpus_per_node or group_size < 2:
            return intra
        remote = (group_size - cluster.gpus_per_node) / (group_size - 1)
        return max(cluster.inter_node_link.transfer_time(remote, 0), intra * (1 - remote))

    def compute_time(self, work: RankWork) -> float:
        r = self._rates
        tokens = work.num_tokens
        dense = 0.0
        if tokens or work.num_sampled:
            dense = max(tokens * r.token_flops_s + work.num_sampled * r.sampled_flops_s,
                        r.weights_s + tokens * r.token_bytes_s)
        return dense + work.attn_pairs * r.pair_s + work.decode_kv_tokens * r.kv_token_s

    def comm_time(self, work: RankWork) -> tuple[float, float]:
        """(seconds of all the rank's traffic, seconds of its overlappable part)."""
        r = self._rates
        total = overlappable = 0.0
        latency = r.world_latency_s if work.num_collectives else 0.0
        for phase, num_bytes in work.comm_bytes.items():
            if phase == "tp":
                total += num_bytes * r.tp_byte_s
                continue
            seconds = num_bytes * r.world_byte_s
            total += seconds
            if phase == "prefill_attn" and num_bytes and work.overlappable_bytes:
                overlappable = seconds * min(1.0, work.overlappable_bytes / num_bytes)
        if work.comm_bytes and set(work.comm_bytes) == {"tp"}:
            latency = r.tp_latency_s
        return total + work.num_collectives * latency, overlappable

    def rank_time(self, work: RankWork) -> float:
        compute = self.compute_time(work)
        if not (work.comm_bytes or work.num_collectives):
            return compute
        comm, overlappable = self.comm_time(work)
        return compute + comm - min(overlappable, compute)

    def iteration_time(self, works: Sequence[RankWork]) -> float:
        return max((self.rank_time(w) for w in works), default=0.0) + self.iteration_overhead_s

    # ---- JSON -----------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, data: dict) -> RooflineCostModel:
        from csps.costmodel.models import model_shape

        cluster = data["cluster"]
        cluster = (ClusterSpec.parse(cluster) if isinstance(cluster, str)
                   else ClusterSpec.from_dict(cluster))
        dtype = data.get("dtype", "bfloat16")
        if dtype not in DTYPE_BYTES:
            raise ValueError(f"dtype must be one of {sorted(DTYPE_BYTES)}, got {dtype!r}")
        if "shape" in data:  # written by to_dict: the full shape, whatever the model file
            shape = ModelShape(**{**data["shape"], "dtype_bytes": DTYPE_BYTES[dtype]})
        else:
            shape = model_shape(data["model"], dtype_bytes=DTYPE_BYTES[dtype])
        overhead = data.get("iteration_overhead_s", cls.iteration_overhead_s)
        return cls(cluster, shape, tp=int(data.get("tp", 1)), sp=int(data.get("sp", 1)),
                   iteration_overhead_s=float(overhead))

    def to_dict(self) -> dict:
        """JSON-ready; from_dict(to_dict()) gives an equal model."""
        return {"kind": "roofline", "cluster": self.cluster.to_dict(),
                "model": self.shape.name, "shape": dataclasses.asdict(self.shape),
                "tp": self.tp, "sp": self.sp,
                "dtype": {2: "bfloat16", 4: "float32"}[self.shape.dtype_bytes],
                "iteration_overhead_s": self.iteration_overhead_s}
