"""The server's prefix-cache counters, scraped from its Prometheus /metrics before and after a
run: queried and hit prompt tokens (`csps:prefix_cache_{queries,hits}_total`, or vLLM's
`vllm:` names), and the run's deltas as result fields. A server without them, or without
/metrics, gives None: the run goes on. No torch.
"""

from __future__ import annotations

from dataclasses import dataclass

import httpx
from prometheus_client.parser import text_string_to_metric_families

PREFIXES = ("csps:", "vllm:")
SCRAPE_TIMEOUT_S = 10.0  # a /metrics that hangs must not hold the benchmark
QUERIES, HITS = "prefix_cache_queries_total", "prefix_cache_hits_total"


@dataclass(frozen=True, slots=True)
class PrefixCacheCounters:
    """Totals since the server started, in tokens; None where the server exports no counter."""

    queries: float | None
    hits: float | None


def parse_prefix_cache_counters(text: str, model_name: str | None = None
                                ) -> PrefixCacheCounters | None:
    """The counters in a Prometheus text exposition, summed over label sets (only those whose
    `model_name` is `model_name`, when any is); None when neither counter is there.
    ValueError when the text does not parse."""
    samples: dict[str, list[tuple[dict[str, str], float]]] = {QUERIES: [], HITS: []}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            for prefix in PREFIXES:
                name = sample.name.removeprefix(prefix)
                if sample.name.startswith(prefix) and name in samples:
                    samples[name].append((sample.labels, float(sample.value)))
    if not samples[QUERIES] and not samples[HITS]:
        return None

    def total(name: str) -> float | None:
        found = samples[name]
        mine = [value for labels, value in found if labels.get("model_name") == model_name]
        return (sum(mine) if mine else sum(value for _, value in found)) if found else None

    return PrefixCacheCounters(queries=total(QUERIES), hits=total(HITS))


async def scrape_prefix_cache(client: httpx.AsyncClient, base_url: str, model_name: str | None,
                              headers: dict[str, str] | None = None
                              ) -> PrefixCacheCounters | None:
    """GET {base_url}/metrics and parse it; None on any failure (no route, error, bad text)."""
    try:
        response = await client.get(base_url.rstrip("/") + "/metrics", headers=headers or {},
                                    timeout=SCRAPE_TIMEOUT_S)
        if response.status_code != 200:
            return None
        return parse_prefix_cache_counters(response.text, model_name)
    except (httpx.HTTPError, ValueError):
        return None


def prefix_cache_fields(before: PrefixCacheCounters | None,
                        after: PrefixCacheCounters | None) -> dict[str, float | int | None]:
    """The run's `prefix_cache_queries`, `prefix_cache_hits` (tokens) and
    `prefix_cache_hit_rate` (hits / queries); None where a scrape or counter is missing, or
    a counter went down (the server restarted)."""
    def delta(name: str) -> float | int | None:
        first, last = (getattr(c, name) if c is not None else None for c in (before, after))
        if first is None or last is None or last < first:
            return None
        return int(last - first) if float(last - first).is_integer() else last - first

    queries, hits = delta("queries"), delta("hits")
    rate = hits / queries if queries and hits is not None else None
    return {"prefix_cache_queries": queries, "prefix_cache_hits": hits,
            "prefix_cache_hit_rate": rate}
