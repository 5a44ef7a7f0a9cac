"""Prometheus stat logger: vLLM's metric names, units and buckets under the `csps:` prefix.

The engine calls `PrometheusStatLogger.log(IterationStats)` after every step (from its own
thread; prometheus_client is thread-safe). Each app owns its CollectorRegistry, so several apps
can live in one process (tests) without clashing on the global registry.
"""

from __future__ import annotations

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
)

from csps.contract.step import COMM_PHASES
from csps.engine.outputs import IterationStats

PREFIX = "csps:"
FINISH_REASONS = ("stop", "length", "abort", "error")

TTFT_BUCKETS = [0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0,
                7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0]
TOKEN_LATENCY_BUCKETS = [0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0,
                         2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0]
REQUEST_LATENCY_BUCKETS = [0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0,
                           50.0, 60.0, 120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0]
ITERATION_TOKEN_BUCKETS = [1, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384]


def token_count_buckets(max_value: int) -> list[int]:
    """1, 2, 5, 10, 20, 50, ... up to `max_value` (vLLM's 1-2-5 series for token counts)."""
    buckets, exponent = [], 0
    while True:
        for mantissa in (1, 2, 5):
            value = mantissa * 10**exponent
            if value > max_value:
                return buckets
            buckets.append(value)
        exponent += 1


class PrometheusStatLogger:
    def __init__(self, model_name: str, registry: CollectorRegistry | None = None,
                 max_model_len: int = 131072) -> None:
        disable_created_metrics()  # process-wide, as vLLM does: no `*_created` series
        self.registry = registry if registry is not None else CollectorRegistry()
        self.model_name = model_name

        def histogram(name: str, doc: str, buckets: list[float]):
            return Histogram(PREFIX + name, doc, ["model_name"], buckets=buckets,
                             registry=self.registry).labels(model_name)

        def counter(name: str, doc: str):
            return Counter(PREFIX + name, doc, ["model_name"],
                           registry=self.registry).labels(model_name)

        def gauge(name: str, doc: str):
            return Gauge(PREFIX + name, doc, ["model_name"],
                         registry=self.registry).labels(model_name)

        token_buckets = token_count_buckets(max_model_len)
        self.ttft = histogram("time_to_first_token_seconds", "Time to first token.", TTFT_BUCKETS)
        self.itl = histogram("inter_token_latency_seconds", "Time between consecutive tokens.",
                             TOKEN_LATENCY_BUCKETS)
        self.tpot = histogram("request_time_per_output_token_seconds",
                              "Decode time per output token of finished requests.",
                              TOKEN_LATENCY_BUCKETS)
        self.e2e = histogram("e2e_request_latency_seconds", "End-to-end request latency.",
                             REQUEST_LATENCY_BUCKETS)
        self.queue_time = histogram("request_queue_time_seconds", "Time spent waiting.",
                                    REQUEST_LATENCY_BUCKETS)
        self.prefill_time = histogram("request_prefill_time_seconds", "Time spent in prefill.",
                                      REQUEST_LATENCY_BUCKETS)
        self.decode_time = histogram("request_decode_time_seconds", "Time spent in decode.",
                                     REQUEST_LATENCY_BUCKETS)
        self.request_prompt_tokens = histogram("request_prompt_tokens",
                                               "Prompt tokens per finished request.", token_buckets)
        self.request_generation_tokens = histogram(
            "request_generation_tokens", "Generated tokens per finished request.", token_buckets)
        self.iteration_tokens = histogram("iteration_tokens_total", "Tokens per engine step.",
                                          ITERATION_TOKEN_BUCKETS)
        self.prompt_tokens = counter("prompt_tokens_total", "Prefill tokens processed.")
        self.generation_tokens = counter("generation_tokens_total", "Tokens generated.")
        self.num_preemptions = counter("num_preemptions_total",
                                       "Requests preempted (KV freed, to be recomputed).")
        self.prefix_cache_queries = counter(
            "prefix_cache_queries_total", "Prompt tokens looked up in the prefix cache.")
        self.prefix_cache_hits = counter(
            "prefix_cache_hits_total", "Prompt tokens found in the prefix cache.")
        self.request_success = Counter(PREFIX + "request_success_total",
                                       "Finished requests by finish reason.",
                                       ["model_name", "finished_reason"], registry=self.registry)
        for reason in FINISH_REASONS:  # export zeros before the first request finishes
            self.request_success.labels(model_name, reason)
        self.comm_bytes = Counter(PREFIX + "comm_bytes_total",
                                  "Bytes the workers sent to each other, summed over workers, "
                                  "by phase (prefill_attn, decode_attn, tp, control).",
                                  ["model_name", "phase"], registry=self.registry)
        for phase in COMM_PHASES:
            self.comm_bytes.labels(model_name, phase)
        self.num_running = gauge("num_requests_running", "Requests running on the engine.")
        self.num_waiting = gauge("num_requests_waiting", "Requests waiting to be scheduled.")
        self.kv_cache_usage = gauge("kv_cache_usage_perc",
                                    "Fraction of KV cache blocks in use (0-1).")

    def log(self, stats: IterationStats) -> None:
        """Record one engine step. Called by the engine after every step, and with the
        finished requests of an abort or a failure outside a step (no tokens: no iteration)."""
        num_tokens = stats.num_prompt_tokens + stats.num_generation_tokens
        if num_tokens:
            self.iteration_tokens.observe(num_tokens)
        self.prompt_tokens.inc(stats.num_prompt_tokens)
        self.generation_tokens.inc(stats.num_generation_tokens)
        self.num_preemptions.inc(stats.num_preempted_reqs)
        self.prefix_cache_queries.inc(stats.prefix_cache_queries)
        self.prefix_cache_hits.inc(stats.prefix_cache_hits)
        for ttft in stats.ttfts_s:
            self.ttft.observe(ttft)
        for itl in stats.inter_token_latencies_s:
            self.itl.observe(itl)
        for done in stats.finished:
            self.e2e.observe(done.e2e_latency_s)
            for histogram, seconds in ((self.queue_time, done.queue_time_s),
                                       (self.prefill_time, done.prefill_time_s),
                                       (self.decode_time, done.decode_time_s),
                                       (self.tpot, done.time_per_output_token_s)):
                if seconds is not None:  # a phase the request never reached
                    histogram.observe(seconds)
            self.request_prompt_tokens.observe(done.num_prompt_tokens)
            self.request_generation_tokens.observe(done.num_generation_tokens)
            self.request_success.labels(self.model_name, done.finish_reason).inc()
        for phase, num_bytes in stats.comm_bytes.items():
            self.comm_bytes.labels(self.model_name, phase).inc(num_bytes)
        self.set_load(stats.num_running, stats.num_waiting, stats.kv_cache_usage)

    def set_load(self, num_running: int, num_waiting: int, kv_cache_usage: float) -> None:
        self.num_running.set(num_running)
        self.num_waiting.set(num_waiting)
        self.kv_cache_usage.set(kv_cache_usage)

    def render(self) -> tuple[bytes, str]:
        """The exposition text and its content type, for GET /metrics."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
