"""`n` samples of one prompt: the engine runs n child requests (vLLM's ParentRequest) and
reports them under the parent's id, each child's completion at its `index`.

A parent's outputs each carry the completion that changed; the parent is finished when its
last child is. `merge_output` folds a request's outputs into one with every completion, for
callers that want the final result (offline generate, non-streaming responses).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from csps.engine.outputs import RequestOutput
from csps.request import SamplingParams


def child_params(params: SamplingParams, index: int) -> SamplingParams:
    """Sample `index` of n: one sequence, its own seed when the parent has one."""
    seed = None if params.seed is None else params.seed + index
    return replace(params, n=1, seed=seed)


def child_id(parent_id: str, index: int) -> str:
    return f"{index}_{parent_id}"  # vLLM's naming


@dataclass
class ParentRequest:
    request_id: str
    n: int
    num_finished: int = 0
    child_ids: list[str] = field(default_factory=list)

    def wrap(self, output: RequestOutput) -> RequestOutput:
        """A child's output (its completion already at its index) as the parent's."""
        self.num_finished += output.finished
        return replace(output, request_id=self.request_id,
                       finished=self.num_finished == self.n)


class ParentBook:
    """Which child belongs to which parent, for the engine."""

    def __init__(self) -> None:
        self._parents: dict[str, ParentRequest] = {}
        self._children: dict[str, ParentRequest] = {}

    def add(self, parent_id: str, n: int) -> list[str]:
        parent = ParentRequest(parent_id, n, child_ids=[child_id(parent_id, i) for i in range(n)])
        self._parents[parent_id] = parent
        for request_id in parent.child_ids:
            self._children[request_id] = parent
        return parent.child_ids

    def child_ids(self, request_ids: list[str]) -> list[str]:
        """Request ids with every parent replaced by its children (to abort them)."""
        out = []
        for request_id in request_ids:
            parent = self._parents.get(request_id)
            out += parent.child_ids if parent is not None else [request_id]
        return out

    def wrap(self, outputs: list[RequestOutput]) -> list[RequestOutput]:
        wrapped = []
        for output in outputs:
            parent = self._children.get(output.request_id)
            if parent is None:
                wrapped.append(output)
                continue
            wrapped.append(parent.wrap(output))
            if output.finished:
                del self._children[output.request_id]
                if parent.num_finished == parent.n:
                    del self._parents[parent.request_id]
        return wrapped


def merge_output(previous: RequestOutput | None, output: RequestOutput) -> RequestOutput:
    """`output` with the latest completion of every index seen so far for its request."""
    if previous is None:
        return output
    by_index = {c.index: c for c in previous.outputs}
    by_index.update({c.index: c for c in output.outputs})
    return replace(output, outputs=[by_index[i] for i in sorted(by_index)],
                   error=output.error or previous.error,
                   prompt_logprobs=output.prompt_logprobs or previous.prompt_logprobs)
