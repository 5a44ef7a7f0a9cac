"""Which replica a simulated request is sent to, under data parallelism (`csps simulate -dp`).

`least-loaded` (the default): the replica with the fewest unfinished requests (waiting plus
running), the lowest index on ties. `prefix`, as SGLang's cache-aware router: when the longest
leading run of the request's Mooncake hash ids sent to one replica before covers at least
MATCH_THRESHOLD of its ids, that replica (its prefix cache is the one likely to hold them;
replicas share no KV), the least loaded of them on ties; otherwise the least loaded of all, so a
prefix every prompt shares (a system prompt) does not pin all traffic to one replica. No torch.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from csps.scheduler import Scheduler

ROUTINGS = ("least-loaded", "prefix")
MATCH_THRESHOLD = 0.5  # fraction of a request's hash ids matched to follow them (SGLang's)


class _PrefixNode:
    __slots__ = ("children", "replicas")

    def __init__(self) -> None:
        self.children: dict[int, _PrefixNode] = {}  # next hash id -> node
        self.replicas: set[int] = set()  # replicas sent a prompt beginning with this prefix


class Router:
    def __init__(self, routing: str = "least-loaded") -> None:
        if routing not in ROUTINGS:
            raise ValueError(f"routing must be one of {ROUTINGS}, got {routing!r}")
        self.routing = routing
        self._root = _PrefixNode()  # the hash ids of every prompt sent so far, by position

    def route(self, hash_ids: Sequence[int], schedulers: Sequence[Scheduler]) -> int:
        """The replica for a request with these hash ids (books them under `prefix`)."""
        candidates = range(len(schedulers))
        if self.routing == "prefix" and hash_ids:
            matched, replicas = self._longest_match(hash_ids)
            if matched >= MATCH_THRESHOLD * len(hash_ids):
                candidates = replicas or candidates
        replica = min(candidates, key=lambda i: (
            schedulers[i].num_waiting + schedulers[i].num_running, i))
        if self.routing == "prefix":
            self._book(hash_ids, replica)
        return replica

    def _longest_match(self, hash_ids: Sequence[int]) -> tuple[int, list[int]]:
        """(how many leading ids were sent before, the replicas they were sent to)."""
        node, matched = self._root, 0
        for hash_id in hash_ids:
            child = node.children.get(hash_id)
            if child is None:
                break
            node, matched = child, matched + 1
        return matched, sorted(node.replicas)

    def _book(self, hash_ids: Sequence[int], replica: int) -> None:
        node = self._root
        for hash_id in hash_ids:
            node = node.children.setdefault(hash_id, _PrefixNode())
            node.replicas.add(replica)
