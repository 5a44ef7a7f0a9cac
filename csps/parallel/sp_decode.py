"""Decode attention over KV spread across an SP group (algorithms.md §2.4): q-move and kv-move.

Per layer, two all-to-alls on the SP group carry every distributed decode of the iteration:
leaders send each new token's q, k, v ([Hq + 2 Hkv, D]) to the ranks holding its KV, and the
holders send back (out [Hq, D], lse [Hq]) in fp32. Bytes per decode per holder are flat in the
context length: (Hq + 2 Hkv) * D * e out and Hq * (D + 1) * 4 back. The leader merges the parts
with the shared log-sum-exp merge (attention/merge.py).

kv-move, the approach the paper avoids, for comparison: the new token's k, v go to the holders
(the one that stores it keeps them), then every holder sends the request's whole local K/V to the
leader, which attends over all of it: bytes grow with the context.
"""

from __future__ import annotations

import torch

from csps.attention.merge import merge_attn_states
from csps.attention.paged_views import MAX_RUNS, decode_over_runs, slot_runs
from csps.attention.partial import partial_attention
from csps.attention.sp_decode_plan import SpDecodePlan
from csps.kvcache.paged_cache import KVCache
from csps.parallel.comm import Communicator


def qmove_decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                           kv_cache: KVCache, plan: SpDecodePlan, comm: Communicator,
                           scale: float) -> torch.Tensor:
    """q [n, Hq, D], k/v [n, Hkv, D]: the new tokens of the n decodes this rank leads ->
    attention output [n, Hq, D]. Collective on comm's group: every rank calls it each layer."""
    num_heads, num_kv_heads, head_dim = q.shape[1], k.shape[1], q.shape[2]
    width = (num_heads + 2 * num_kv_heads) * head_dim
    packed = torch.cat([q.reshape(len(q), num_heads * head_dim),
                        k.reshape(len(k), num_kv_heads * head_dim),
                        v.reshape(len(v), num_kv_heads * head_dim)], dim=1)  # [n, width]
    sends = [packed[index] for index in plan.send_index]
    received = torch.cat(comm.all_to_all(sends, [(c, width) for c in plan.recv_counts]))
    partials = _attend_held(received, kv_cache, plan, num_heads, num_kv_heads, head_dim, scale)
    part_width = num_heads * (head_dim + 1)
    returned = comm.all_to_all(list(partials.split(plan.recv_counts)),
                               [(len(index), part_width) for index in plan.send_index])
    # Scatter each holder's parts to the decodes they belong to; non-holders stay at lse -inf.
    outs, lses = [], []
    for index, part in zip(plan.send_index, returned, strict=True):
        out = q.new_zeros(plan.num_led, num_heads, head_dim, dtype=torch.float32)
        lse = torch.full((plan.num_led, num_heads), float("-inf"), device=q.device)
        rows = torch.tensor(index, dtype=torch.int64, device=q.device)
        out[rows] = part[:, :num_heads * head_dim].view(-1, num_heads, head_dim)
        lse[rows] = part[:, num_heads * head_dim:]
        outs.append(out)
        lses.append(lse)
    merged, _ = merge_attn_states(outs, lses)
    return merged.to(q.dtype)


def kvmove_decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                            kv_cache: KVCache, plan: SpDecodePlan, comm: Communicator,
                            scale: float) -> torch.Tensor:
    """Same contract as qmove_decode_attention, moving the KV to the leader instead."""
    num_heads, num_kv_heads, head_dim = q.shape[1], k.shape[1], q.shape[2]
    kv_size = num_kv_heads * head_dim
    new_kv = torch.cat([k.reshape(len(k), kv_size), v.reshape(len(v), kv_size)], dim=1)
    received = torch.cat(comm.all_to_all([new_kv[index] for index in plan.send_index],
                                         [(c, 2 * kv_size) for c in plan.recv_counts]))
    k_flat = kv_cache.k_cache.view(-1, num_kv_heads, head_dim)
    v_flat = kv_cache.v_cache.view(-1, num_kv_heads, head_dim)
    local_kv = []  # per held decode: [n_i, 2 kv_size], its K/V on this rank
    for i, held in enumerate(plan.held):
        if held.store_slot >= 0:
            slot = torch.tensor([held.store_slot], dtype=torch.int64, device=k.device)
            kv_cache.write_slots(received[i, :kv_size].view(1, num_kv_heads, head_dim),
                                 received[i, kv_size:].view(1, num_kv_heads, head_dim), slot)
        local_kv.append(torch.cat([k_flat.index_select(0, held.slots).view(-1, kv_size),
                                   v_flat.index_select(0, held.slots).view(-1, kv_size)], 1))
    starts = [0]
    for count in plan.recv_counts:
        starts.append(starts[-1] + count)
    sends = [torch.cat(local_kv[a:b]) if b > a else new_kv.new_empty(0, 2 * kv_size)
             for a, b in zip(starts, starts[1:], strict=False)]
    parts = comm.all_to_all(sends, [(sum(tokens), 2 * kv_size) for tokens in plan.held_tokens])
    pieces: list[list[torch.Tensor]] = [[] for _ in range(plan.num_led)]
    for index, tokens, part in zip(plan.send_index, plan.held_tokens, parts, strict=True):
        for i, chunk in zip(index, part.split(tokens), strict=True):
            pieces[i].append(chunk)
    out = q.new_empty(plan.num_led, num_heads, head_dim)
    for i, chunks in enumerate(pieces):
        kv = torch.cat(chunks)  # [context, 2 kv_size], the request's whole KV
        keys, values = kv.split([kv_size, kv_size], dim=1)
        out[i] = partial_attention(q[i:i + 1], keys.view(-1, num_kv_heads, head_dim),
                                   values.view(-1, num_kv_heads, head_dim), scale=scale)[0][0]
    return out


def _attend_held(received: torch.Tensor, kv_cache: KVCache, plan: SpDecodePlan,
                 num_heads: int, num_kv_heads: int, head_dim: int,
                 scale: float) -> torch.Tensor:
    """received [m, width] (the held decodes' q|k|v) -> partials [m, Hq * (D + 1)] fp32."""
    q_size, kv_size = num_heads * head_dim, num_kv_heads * head_dim
    q, k, v = received.split([q_size, kv_size, kv_size], dim=1)
    stores = [i for i, h in enumerate(plan.held) if h.store_slot >= 0]
    if stores:  # the new tokens' K/V first: each attends to itself
        rows = torch.tensor(stores, dtype=torch.int64, device=k.device)
        slots = torch.tensor([plan.held[i].store_slot for i in stores], dtype=torch.int64,
                             device=k.device)
        kv_cache.write_slots(k[rows].view(-1, num_kv_heads, head_dim),
                             v[rows].view(-1, num_kv_heads, head_dim), slots)
    k_flat = kv_cache.k_cache.view(-1, num_kv_heads, head_dim)
    v_flat = kv_cache.v_cache.view(-1, num_kv_heads, head_dim)
    partials = received.new_empty(len(plan.held), num_heads * (head_dim + 1),
                                  dtype=torch.float32)
    for i, held in enumerate(plan.held):
        runs = slot_runs(held.slots)
        if len(runs) <= MAX_RUNS:  # read the held slots in place, as views of the cache
            out, lse = decode_over_runs(q[i].view(num_heads, head_dim), k_flat, v_flat, runs,
                                        scale)
        else:  # fragmented: one gather of the held slots
            out, lse = partial_attention(q[i].view(1, num_heads, head_dim),
                                         k_flat.index_select(0, held.slots),
                                         v_flat.index_select(0, held.slots), scale=scale)
        partials[i, :q_size] = out.reshape(-1).float()
        partials[i, q_size:] = lse.reshape(-1)
    return partials
