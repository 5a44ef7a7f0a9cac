"""Single-worker prefill and decode throughput: csps vs Hugging Face transformers, same model,
same process, measurements interleaved and repeated (the median is reported).

    .venv/bin/python benchmarks/single_worker.py --out benchmarks/results/single_worker.json

Prefill: one request of N prompt tokens (csps: the whole prompt in one iteration with the vllm
policy, and in 512-token chunks with sarathi; HF: one forward with use_cache=True).
Decode: B requests with 512-token prompts, then D greedy steps; tokens/s = B * D / time of the
D decode steps (csps: engine steps with no prefill in them; HF: a static batch of B, forward with
past_key_values). Ratios are reported against HF's static batch of the same size and against HF
serving the B requests one at a time (its batch-1 throughput), which is what batching buys.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
from transformers import LlamaForCausalLM

from csps import LLM, SamplingParams
from csps.model.resolve import resolve_model


def csps_prefill_s(llm: LLM, num_tokens: int, seed: int) -> float:
    engine = llm.llm_engine
    prompt = torch.randint(100, 40000, (num_tokens,), generator=torch.Generator().manual_seed(seed))
    start = time.perf_counter()
    engine.add_request(f"p{seed}-{num_tokens}", None, prompt.tolist(),
                       SamplingParams(temperature=0, max_tokens=1))
    while engine.has_unfinished_requests():
        engine.step()
    return time.perf_counter() - start


def hf_prefill_s(model, num_tokens: int, seed: int) -> float:
    gen = torch.Generator().manual_seed(seed)
    prompt = torch.randint(100, 40000, (1, num_tokens), generator=gen)
    start = time.perf_counter()
    with torch.inference_mode():
        model(prompt, use_cache=True)
    return time.perf_counter() - start


def csps_decode_tps(llm: LLM, batch: int, prompt_len: int, steps: int, seed: int) -> float:
    engine = llm.llm_engine
    gen = torch.Generator().manual_seed(seed)
    params = SamplingParams(temperature=0, max_tokens=steps + 1, ignore_eos=True)
    for i in range(batch):
        engine.add_request(f"d{seed}-{batch}-{i}", None,
                           torch.randint(100, 40000, (prompt_len,), generator=gen).tolist(), params)
    decode_time, decode_tokens = 0.0, 0
    while engine.has_unfinished_requests():
        start = time.perf_counter()
        outputs, stats = engine.step()
        elapsed = time.perf_counter() - start
        if stats.num_prompt_tokens == 0:
            decode_time += elapsed
            decode_tokens += stats.num_generation_tokens
    return decode_tokens / decode_time


def hf_decode_tps(model, batch: int, prompt_len: int, steps: int, seed: int) -> float:
    gen = torch.Generator().manual_seed(seed)
    prompt = torch.randint(100, 40000, (batch, prompt_len), generator=gen)
    with torch.inference_mode():
        out = model(prompt, use_cache=True)
        past, token = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
        start = time.perf_counter()
        for _ in range(steps):
            out = model(token, past_key_values=past, use_cache=True)
            past, token = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
        return batch * steps / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--prefill-lens", type=int, nargs="+", default=[1024, 4096])
    parser.add_argument("--decode-batches", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--decode-prompt-len", type=int, default=512)
    parser.add_argument("--decode-steps", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default="benchmarks/results/single_worker.json")
    args = parser.parse_args()
    torch.manual_seed(0)
    model_dir = resolve_model(args.model)
    max_len = max(args.prefill_lens) + 8
    common = dict(dtype="float32", max_model_len=max_len, kv_cache_memory_bytes=3 << 30,
                  enable_prefix_caching=False)  # repeated prompts must not be cache hits
    systems = {
        "csps_vllm": LLM(args.model, scheduler="vllm", max_num_batched_tokens=max_len, **common),
        "csps_sarathi512": LLM(args.model, scheduler="sarathi", max_num_batched_tokens=512,
                               **common),
    }
    hf = LlamaForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    # Warm-up: first calls pay one-off allocation costs.
    for llm in systems.values():
        csps_prefill_s(llm, 256, seed=99)
    hf_prefill_s(hf, 256, seed=99)

    samples: dict[str, list[float]] = {}
    for rep in range(args.repeats):
        for n in args.prefill_lens:
            samples.setdefault(f"prefill_tps/hf/{n}", []).append(n / hf_prefill_s(hf, n, rep))
            for name, llm in systems.items():
                samples.setdefault(f"prefill_tps/{name}/{n}", []).append(
                    n / csps_prefill_s(llm, n, rep))
        for b in args.decode_batches:
            samples.setdefault(f"decode_tps/hf/{b}", []).append(
                hf_decode_tps(hf, b, args.decode_prompt_len, args.decode_steps, rep))
            samples.setdefault(f"decode_tps/csps_sarathi512/{b}", []).append(
                csps_decode_tps(systems["csps_sarathi512"], b, args.decode_prompt_len,
                                args.decode_steps, rep))
        print(f"repeat {rep + 1}/{args.repeats} done", flush=True)

    median = {key: statistics.median(values) for key, values in samples.items()}
    ratios = {}
    for n in args.prefill_lens:
        for name in systems:
            ratios[f"prefill/{name}/{n}"] = median[f"prefill_tps/{name}/{n}"] / \
                median[f"prefill_tps/hf/{n}"]
    for b in args.decode_batches:
        ratios[f"decode/csps_sarathi512/{b}"] = median[f"decode_tps/csps_sarathi512/{b}"] / \
            median[f"decode_tps/hf/{b}"]
        # HF without a serving layer runs requests one at a time: its throughput is batch 1's.
        ratios[f"decode/csps_sarathi512/{b}_vs_hf_one_at_a_time"] = (
            median[f"decode_tps/csps_sarathi512/{b}"]
            / median[f"decode_tps/hf/{min(args.decode_batches)}"])
    result = {"config": vars(args), "torch_threads": torch.get_num_threads(),
              "median_tokens_per_s": median, "ratio_csps_over_hf": ratios, "samples": samples}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    for key, value in ratios.items():
        print(f"{key:40s} csps/hf = {value:.2f}")


if __name__ == "__main__":
    main()
