"""BatchBuilder: the iteration being assembled, holding the remaining token budget. No torch."""

from __future__ import annotations

from csps.contract.step import KvMove
from csps.request import Request


class BatchBuilder:
    def __init__(self, token_budget: int) -> None:
        self.token_budget = token_budget
        self.entries: list[tuple[Request, int]] = []  # (request, tokens scheduled), in order
        self._request_ids: set[str] = set()
        self.kv_moves: list[KvMove] = []  # copies the step runs after its forward

    def __contains__(self, request: Request) -> bool:
        return request.request_id in self._request_ids

    @property
    def is_empty(self) -> bool:
        return not (self.entries or self.kv_moves)

    def add(self, request: Request, num_tokens: int) -> None:
        if num_tokens < 1 or num_tokens > self.token_budget:
            raise ValueError(f"cannot schedule {num_tokens} tokens with budget {self.token_budget}")
        if request in self:
            raise ValueError(f"request {request.request_id} scheduled twice in one iteration")
        self.entries.append((request, num_tokens))
        self._request_ids.add(request.request_id)
        self.token_budget -= num_tokens

    def remove(self, request: Request) -> None:
        """Drop a request (it was preempted after being scheduled) and refund its tokens."""
        for i, (entry, num_tokens) in enumerate(self.entries):
            if entry.request_id == request.request_id:
                del self.entries[i]
                self._request_ids.discard(request.request_id)
                self.token_budget += num_tokens
                return
