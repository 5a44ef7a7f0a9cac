"""Replaying a measured run through the simulator, and the per-request error of the replay
(issue 7 item 2: simulator validation). No torch.

A `csps bench serve` result holds, per request, its send time (`start_times`, s), prompt and
generated lengths (`input_lens`, `output_lens`) and its measured `ttfts`, `itls`, `latencies`.
`replay_specs` turns the successful requests into the simulator's RequestSpecs (same send
times, same lengths, max_tokens = the tokens the real server generated, which under
ignore_eos is what was asked); `compare_results` pairs each request's real and simulated
TTFT, TBT (the request's mean inter-token latency) and E2E latency, and gives the relative
errors (simulated - real) / real and their median absolute value per metric. A trace
replay's `hash_ids` (one list per request; `hash_block_tokens` tokens per id) go with the specs,
so the simulator's prompts share what the real prompts shared and its prefix cache hits alike.
"""

from __future__ import annotations

import math

import numpy as np

from csps.bench.workload import RequestSpec

METRICS = ("ttft", "tbt", "e2el")  # per request: first token, mean ITL, end-to-end (s)


def replay_specs(result: dict, admission_s: float = 0.0) -> tuple[list[int], list[RequestSpec]]:
    """(indices into the result's arrays, specs) of its successful requests, in send order.
    admission_s: the server admits one request at a time (HTTP, tokenization), so requests
    sent closer together than that reach its scheduler admission_s apart, in send order."""
    errors = result.get("errors") or [""] * len(result["input_lens"])
    kept = [i for i, error in enumerate(errors) if not error and result["output_lens"][i] > 0]
    if not kept:
        raise ValueError("the result has no successful request to replay")
    kept.sort(key=lambda i: result["start_times"][i])
    origin = result["start_times"][kept[0]]
    hash_ids = result.get("hash_ids") or [()] * len(result["input_lens"])
    specs, at = [], -math.inf
    for i in kept:
        at = max(result["start_times"][i] - origin, at + admission_s)
        specs.append(RequestSpec(at, int(result["input_lens"][i]), int(result["output_lens"][i]),
                                 tuple(hash_ids[i])))
    return kept, specs


def request_metrics(result: dict, indices: list[int]) -> dict[str, list[float | None]]:
    """Per request of `indices`: TTFT, TBT (mean ITL; None with fewer than 2 tokens), E2E (s)."""
    itls = result.get("itls") or [[] for _ in result["input_lens"]]
    return {"ttft": [float(result["ttfts"][i]) for i in indices],
            "tbt": [float(np.mean(itls[i])) if itls[i] else None for i in indices],
            "e2el": [float(result["latencies"][i]) for i in indices]}


def relative_errors(real: list[float | None], simulated: list[float | None]) -> list[float]:
    """(simulated - real) / real for the pairs where both exist and real > 0."""
    return [(s - r) / r for r, s in zip(real, simulated, strict=True)
            if r is not None and s is not None and r > 0]


def compare_results(real: dict, simulated: dict, real_indices: list[int]) -> dict:
    """Per metric: the real and simulated per-request values, the relative errors and their
    median absolute / mean signed values. `simulated` is the replay's result, whose requests
    are the replayed ones in order; `real_indices` are replay_specs' indices."""
    sim_ok = [i for i, e in enumerate(simulated.get("errors") or []) if e]
    if sim_ok:
        raise ValueError(f"{len(sim_ok)} replayed requests failed in the simulator "
                         f"(first: {simulated['errors'][sim_ok[0]]})")
    measured = request_metrics(real, real_indices)
    replayed = request_metrics(simulated, list(range(len(real_indices))))
    out = {}
    for name in METRICS:
        errors = relative_errors(measured[name], replayed[name])
        out[name] = {"real": measured[name], "simulated": replayed[name],
                     "relative_errors": errors, "num_requests": len(errors),
                     "median_abs_error": float(np.median(np.abs(errors))) if errors else None,
                     "mean_error": float(np.mean(errors)) if errors else None}
    return out


def second_run_in_order(first: dict, second: dict) -> tuple[list[int], dict]:
    """Two real runs of one workload (same trace, seed and flags) paired request by request, as
    `compare_results` pairs a run with its replay: (first's replay_specs indices, the second's
    per-request arrays at those indices). A bench result keeps its requests in workload order,
    so index i is the same request in both runs (requests sent together may start in another
    order). Lengths that differ at an index, or a request that failed in the second run only,
    raise ValueError. Their errors are the run-to-run noise: a floor under any simulator error
    on the machine."""
    indices, _ = replay_specs(first)
    errors = second.get("errors") or [""] * len(second["input_lens"])
    for i in indices:
        if i >= len(second["input_lens"]) or errors[i] or \
                (first["input_lens"][i], first["output_lens"][i]) != \
                (second["input_lens"][i], second["output_lens"][i]):
            raise ValueError(f"request {i} differs between the two runs (lengths or success)")
    itls = second.get("itls") or [[] for _ in second["input_lens"]]
    return indices, {"ttfts": [second["ttfts"][i] for i in indices],
                     "itls": [itls[i] for i in indices],
                     "latencies": [second["latencies"][i] for i in indices],
                     "errors": [""] * len(indices)}
