"""SP-TP: Megatron-style sequence parallelism around tensor-parallel projections (algorithms.md
§2.1). Between blocks each TP rank holds a contiguous slice of the tokens (norms, residuals);
the slices are all-gathered before a column-parallel projection, and the row-parallel
projection's partial sums are reduce-scattered back to slices. Token counts may be uneven.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from csps.parallel.comm import Communicator


def token_split(num_tokens: int, tp_size: int) -> list[int]:
    """Tokens per TP rank, contiguous in rank order, as even as possible, larger first."""
    if tp_size < 1 or num_tokens < 0:
        raise ValueError(f"bad split: {num_tokens} tokens over {tp_size} ranks")
    base, extra = divmod(num_tokens, tp_size)
    return [base + (1 if r < extra else 0) for r in range(tp_size)]


def gather_sequence(x_local: torch.Tensor, sizes: Sequence[int],
                    comm: Communicator) -> torch.Tensor:
    """x_local [sizes[rank], H] -> [sum(sizes), H]: every rank's slice, in rank order."""
    return comm.all_gather(x_local, sizes)


def reduce_scatter_sequence(partial: torch.Tensor, sizes: Sequence[int],
                            comm: Communicator) -> torch.Tensor:
    """partial [sum(sizes), H] (this rank's row-parallel partial sums) -> [sizes[rank], H]:
    this rank's token slice of the sum over the TP group."""
    return comm.reduce_scatter(partial, sizes)


@dataclass(frozen=True)
class TensorParallelContext:
    """What a model needs to run SP-TP on one rank; handed to the model, which calls its
    methods and never touches torch.distributed itself."""

    tp_rank: int  # position in the TP group
    tp_size: int  # ranks sharing heads and MLP columns
    comm: Communicator  # on the TP group; its phase should be "tp" (bytes counted there)

    def __post_init__(self) -> None:
        if (self.comm.size, self.comm.rank) != (self.tp_size, self.tp_rank):
            raise ValueError(f"communicator (rank {self.comm.rank} of {self.comm.size}) is not "
                             f"TP rank {self.tp_rank} of {self.tp_size}")

    def token_split(self, num_tokens: int) -> list[int]:
        return token_split(num_tokens, self.tp_size)

    def local_rows(self, sizes: Sequence[int]) -> slice:
        """This rank's rows of a full [sum(sizes), ...] tensor."""
        start = sum(sizes[:self.tp_rank])
        return slice(start, start + sizes[self.tp_rank])

    def gather(self, x_local: torch.Tensor, sizes: Sequence[int]) -> torch.Tensor:
        return gather_sequence(x_local, sizes, self.comm)

    def reduce_scatter(self, partial: torch.Tensor, sizes: Sequence[int]) -> torch.Tensor:
        return reduce_scatter_sequence(partial, sizes, self.comm)
