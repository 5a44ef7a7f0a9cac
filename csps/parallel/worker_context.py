"""What a worker process needs from its place in the SP x TP grid: the attention backend for
its SP group (and each contiguous part of it holding this rank, for steps on part of the
group), the tensor-parallel context for its TP group and the communicators of KV moves,
sharing one CommStats."""

from __future__ import annotations

from csps.contract.csa_config import CsaConfig
from csps.parallel.comm import CommStats, Communicator
from csps.parallel.groups import ParallelGroups
from csps.parallel.sp_attention import SequenceParallelAttention
from csps.parallel.sp_tp import TensorParallelContext


def make_parallel_context(groups: ParallelGroups, sp_attention: str, stats: CommStats,
                          sp_decode: str = "qmove", csa_config: CsaConfig | None = None,
                          ) -> tuple[SequenceParallelAttention, TensorParallelContext | None]:
    """(attention backend on the SP group, TP context or None when tp_size is 1). Prefill
    attention, decode attention and TP traffic are counted in their own phases of `stats`."""
    comms = {key: (Communicator(group, stats, "prefill_attn"),
                   Communicator(group, stats, "decode_attn"))
             for key, group in groups.sp_subgroups.items()}
    prefill_comm, decode_comm = comms.get((0, groups.sp_size)) or (
        Communicator(groups.sp_group, stats, "prefill_attn"),
        Communicator(groups.sp_group, stats, "decode_attn"))
    backend = SequenceParallelAttention(prefill_comm, sp_attention, decode_comm=decode_comm,
                                        decode_mode=sp_decode, csa_config=csa_config,
                                        sub_groups=comms)
    tp = None
    if groups.tp_size > 1:
        tp = TensorParallelContext(groups.tp_rank, groups.tp_size,
                                   Communicator(groups.tp_group, stats, "tp"))
    return backend, tp


def make_transfer_comms(groups: ParallelGroups, stats: CommStats
                        ) -> dict[tuple[int, int], Communicator]:
    """(first SP rank, size) -> a Communicator counting KV moves (kv_transfer.py) on that
    contiguous part of this rank's SP group, the whole group included."""
    comms = {key: Communicator(group, stats, "kv_transfer")
             for key, group in groups.sp_subgroups.items()}
    comms.setdefault((0, groups.sp_size), Communicator(groups.sp_group, stats, "kv_transfer"))
    return comms
