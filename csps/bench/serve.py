"""`csps bench serve`: resolve the model, build the workload and its prompts, run it, then
print, save and plot the result (vLLM's JSON keys, the prefix-cache fields and the resolved
`config`)."""

from __future__ import annotations

import argparse
import asyncio
from datetime import datetime

import httpx

from csps.bench.client import PROMPT_FORMS, ClientConfig
from csps.bench.metrics import GoodputSLOs, summarize
from csps.bench.plots import has_matplotlib, plot_run
from csps.bench.prefix_cache_stats import prefix_cache_fields
from csps.bench.prompts import PromptBuilder, TextTokenizer, load_tokenizer
from csps.bench.report import default_filename, format_summary, save_result
from csps.bench.runner import PreparedRequest, run_benchmark
from csps.bench.trace_reuse import trace_reuse
from csps.bench.traces import MOONCAKE_BLOCK_TOKENS
from csps.bench.workload import RequestSpec, WorkloadConfig, build_workload

WORKLOAD_FLAGS = ("dataset_name", "num_prompts", "request_rate", "burstiness", "random_input_len",
                  "random_output_len", "random_range_ratio", "dataset_path", "trace_format",
                  "time_scale", "length_scale", "max_input_len", "seed")


def served_model(base_url: str, api_key: str | None) -> str:
    """The first model of GET /v1/models; RuntimeError when the server cannot say."""
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    try:
        response = httpx.get(base_url.rstrip("/") + "/v1/models", headers=headers, timeout=30)
        response.raise_for_status()
        return response.json()["data"][0]["id"]
    except (httpx.HTTPError, KeyError, IndexError, ValueError) as exc:
        raise RuntimeError(f"could not read the served model from {base_url}/v1/models "
                           f"({exc}); pass --model") from None


def block_tokens(workload: WorkloadConfig) -> int:
    """Tokens per hash_id block, scaled as `scale_records` scales the prompt lengths."""
    return max(1, round(MOONCAKE_BLOCK_TOKENS * workload.length_scale))


def uses_token_ids(prompt_form: str, endpoint: str, specs: list[RequestSpec]) -> bool:
    """Whether prompts go as token ids: asked for, or ('auto') on /v1/completions when the
    workload shares prefix blocks, so the server's prefix cache sees exactly the blocks the
    trace shares (text can re-encode differently at a block boundary)."""
    if prompt_form not in PROMPT_FORMS:
        raise ValueError(f"prompt form must be one of {PROMPT_FORMS}, got {prompt_form!r}")
    if prompt_form == "token-ids" and endpoint != "/v1/completions":
        raise ValueError(f"--prompt-form token-ids needs --endpoint /v1/completions, not "
                         f"{endpoint}")
    if prompt_form == "auto":
        return endpoint == "/v1/completions" and any(spec.hash_ids for spec in specs)
    return prompt_form == "token-ids"


def prepare_requests(workload: WorkloadConfig, tokenizer: TextTokenizer,
                     token_ids: bool | None = None, specs: list[RequestSpec] | None = None
                     ) -> list[PreparedRequest]:
    """The workload's requests with prompts built to their token counts: texts, or token ids
    (`token_ids`; None: when the workload shares prefix blocks)."""
    specs = build_workload(workload) if specs is None else specs
    builder = PromptBuilder(tokenizer, seed=workload.seed, block_tokens=block_tokens(workload))
    if token_ids is None:
        token_ids = uses_token_ids("auto", "/v1/completions", specs)
    prepared = []
    for spec in specs:
        if token_ids:
            prompt: str | list[int] = builder.build_ids(spec.input_len, spec.hash_ids)
            input_len = len(prompt)
        else:
            prompt, input_len = builder.build(spec.input_len, spec.hash_ids)
        prepared.append(PreparedRequest(spec.arrival_s, prompt, input_len, spec.output_len))
    return prepared


def run_serve(args: argparse.Namespace, tokenizer: TextTokenizer | None = None) -> int:
    """The whole `bench serve` command; returns the exit status. Bad flag values raise
    ValueError; an unreachable server raises RuntimeError."""
    workload = WorkloadConfig(**{name: getattr(args, name) for name in WORKLOAD_FLAGS})
    slos = GoodputSLOs.parse(args.goodput)
    if args.max_concurrency is not None and args.max_concurrency < 1:
        raise ValueError(f"--max-concurrency must be >= 1, got {args.max_concurrency}")
    if args.num_warmups < 0:
        raise ValueError(f"--num-warmups must be >= 0, got {args.num_warmups}")
    model = args.model or served_model(args.base_url, args.api_key)
    client = ClientConfig(base_url=args.base_url, model=model, endpoint=args.endpoint,
                          api_key=args.api_key, timeout_s=args.timeout_s,
                          ignore_eos=args.ignore_eos)
    specs = build_workload(workload)
    token_ids = uses_token_ids(args.prompt_form, args.endpoint, specs)
    tokenizer = tokenizer or load_tokenizer(args.tokenizer or model)
    requests = prepare_requests(workload, tokenizer, token_ids, specs)
    reuse = (trace_reuse(specs, block_tokens(workload)) if any(s.hash_ids for s in specs)
             else None)
    print(f"benchmarking {model} at {args.base_url}{args.endpoint}: {len(requests)} requests "
          f"({'token-id' if token_ids else 'text'} prompts), label {args.label}")
    outcome = asyncio.run(run_benchmark(requests, client, args.max_concurrency, args.num_warmups,
                                        show_progress=not args.disable_tqdm))
    result = {"date": datetime.now().strftime("%Y%m%d-%H%M%S"), "label": args.label,
              "model_id": model, "tokenizer_id": args.tokenizer or model,
              "num_prompts": len(requests), "request_rate": args.request_rate,
              "burstiness": args.burstiness, "max_concurrency": args.max_concurrency,
              **summarize(outcome.results, outcome.duration_s, slos),
              **prefix_cache_fields(outcome.prefix_cache_before, outcome.prefix_cache_after),
              "trace_reuse": reuse,
              # what a replay needs to rebuild the shared prompt blocks (simulator/replay.py)
              "hash_ids": [list(s.hash_ids) for s in specs] if reuse is not None else None,
              "hash_block_tokens": block_tokens(workload),
              "config": {k: v for k, v in vars(args).items() if k not in ("handler", "parser")}}
    result["config"]["model"] = model
    print(format_summary(result))
    plot_path = args.plot
    if args.save_result:
        filename = args.result_filename or default_filename(
            args.label, args.request_rate, args.max_concurrency, model,
            is_replay=args.dataset_name == "trace")
        saved = save_result(result, args.result_dir, filename)
        print(f"result: {saved}")
        plot_path = plot_path or saved.with_suffix(".png")
    if plot_path and has_matplotlib():
        print(f"plot: {plot_run(result, plot_path, title=f'{args.label}: {model}')}")
    elif plot_path:
        print("matplotlib is not installed: no plot (pip install matplotlib)")
    return 0 if outcome.results and result["completed"] else 1

