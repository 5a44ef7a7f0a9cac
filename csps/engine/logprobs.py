"""Log-probabilities of chosen tokens under the raw model distribution (vLLM's default
`raw_logprobs`: before penalties, bias, temperature and truncation), for sampled tokens and for
prompt tokens (prompt logprobs, which score a text as lm-evaluation-harness does)."""

from __future__ import annotations

import torch

from csps.contract.sampling import TokenLogprobs

PROMPT_ROWS_PER_PASS = 256  # prompt rows turned into [rows, V] logits at a time


def token_logprobs(logits: torch.Tensor, token_ids: list[int],
                   num_top: list[int]) -> list[TokenLogprobs]:
    """logits [N, V] -> per row: token_ids[row]'s log-probability and rank, and the
    num_top[row] most likely tokens."""
    logprobs = torch.log_softmax(logits.float(), dim=-1)  # [N, V]
    chosen_ids = torch.tensor(token_ids, dtype=torch.long, device=logits.device)
    chosen = logprobs.gather(1, chosen_ids[:, None])  # [N, 1]
    ranks = (logprobs > chosen).sum(dim=1) + 1  # [N]
    k = max(num_top, default=0)
    top_values, top_ids = (logprobs.topk(k, dim=-1) if k else (None, None))  # [N, k]
    out = []
    for row, token_id in enumerate(token_ids):
        top: tuple[tuple[int, float], ...] = ()
        if num_top[row]:
            top = tuple(zip(top_ids[row, :num_top[row]].tolist(),
                            top_values[row, :num_top[row]].tolist(), strict=True))
        out.append(TokenLogprobs(token_id, float(chosen[row, 0]), int(ranks[row]), top))
    return out


def prompt_logprobs(model, hidden: torch.Tensor, row_start: int, first_position: int,
                    targets: list[int], num_top: int) -> list[tuple[int, TokenLogprobs]]:
    """hidden [T, H]: rows row_start.. hold positions first_position..; row i predicts
    targets[i], the prompt token at position first_position + i + 1. Returns (position of the
    target, its logprobs) per row."""
    out: list[tuple[int, TokenLogprobs]] = []
    for lo in range(0, len(targets), PROMPT_ROWS_PER_PASS):
        hi = min(lo + PROMPT_ROWS_PER_PASS, len(targets))
        logits = model.compute_logits(hidden[row_start + lo:row_start + hi])  # [n, V]
        for i, entry in enumerate(token_logprobs(logits, targets[lo:hi], [num_top] * (hi - lo))):
            out.append((first_position + lo + i + 1, entry))
    return out
