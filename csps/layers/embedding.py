"""Token embedding and LM head (tied: the head reuses the embedding's weight)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from csps.layers.linear import linear
from csps.layers.quantization import Int8Weight


class VocabEmbedding(nn.Module):
    """input_ids [T] -> [T, hidden_size]. (Vocab-parallel sharding would add a weight_loader.)"""

    def __init__(self, vocab_size: int, hidden_size: int) -> None:
        super().__init__()
        self.vocab_size = vocab_size
        self.weight = nn.Parameter(torch.empty(vocab_size, hidden_size))  # [V, H]

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(input_ids, self.weight)


class LMHead(nn.Module):
    """hidden [N, H] -> logits [N, V] in float32.

    With `tied_embedding`, the head shares the embedding's [V, H] weight and owns no parameter.
    """

    def __init__(self, vocab_size: int, hidden_size: int,
                 tied_embedding: VocabEmbedding | None = None) -> None:
        super().__init__()
        self.vocab_size = vocab_size
        self.is_tied = tied_embedding is not None
        if tied_embedding is not None:
            self.tied_embedding = [tied_embedding]  # a list, so it is not a second submodule
        else:
            self.weight = nn.Parameter(torch.empty(vocab_size, hidden_size))  # [V, H]
        self.int8: Int8Weight | None = None  # set by quantization.quantize_model_int8_

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        if self.int8 is not None:
            return self.int8.matmul(hidden).float()
        weight = self.tied_embedding[0].weight if self.is_tied else self.weight
        # NOTE: the matmul runs in the model dtype (as the reference does); only the result is
        # promoted, so samplers see float32 logits.
        return linear(hidden, weight).float()
