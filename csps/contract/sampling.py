"""What a step tells the sampler beyond the logits, and the log-probabilities it sends back.
Plain values, no torch.

A worker keeps no token history: a request whose sampling depends on what came before
(penalties, min_tokens, a grammar) carries it in its ScheduledRequest's SamplingContext, so any
rank may sample it (a request's leader can move between steps).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class SamplingContext:
    """The history one request's next token is sampled against."""

    output_token_ids: tuple[int, ...]  # tokens generated so far
    prompt_token_ids: tuple[int, ...] = ()  # only when repetition_penalty != 1
    stop_token_ids: tuple[int, ...] = ()  # masked until min_tokens outputs exist (EOS included)
    # prompt logprobs (set when asked for and the step computes prompt positions): the prompt's
    # length and the token after the step's last position, when that is a prompt token
    num_prompt_tokens: int = 0
    next_prompt_token_id: int | None = None

    def prompt_targets(self, token_ids: list[int], num_computed: int, start: int,
                       end: int) -> list[int]:
        """For rows at positions [start, end) of a step running `token_ids` from position
        `num_computed`: the prompt tokens they predict (positions start+1 .. while < prompt
        length), in order."""
        last = min(end, self.num_prompt_tokens - 1)  # the last target position
        scheduled_end = num_computed + len(token_ids)
        return [token_ids[q - num_computed] if q < scheduled_end else self.next_prompt_token_id
                for q in range(start + 1, last + 1)]


@dataclass(frozen=True)
class TokenLogprobs:
    """One position's log-probabilities (raw model distribution, before any processing):
    the chosen token's, its rank (1 = most likely), and the top-k alternatives, best first."""

    token_id: int
    logprob: float
    rank: int
    top: tuple[tuple[int, float], ...] = ()
