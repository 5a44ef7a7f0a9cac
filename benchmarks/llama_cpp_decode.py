"""llama.cpp (llama-cpp-python) on the embedded GGUF: decode at several contexts and prefill,
for the llama.cpp column beside csps and transformers in docs/benchmarks.md (issue 16).

llama-cpp-python is not a csps dependency (it compiles llama.cpp from source); run this from
its own environment, on the same host and thread count as benchmarks/decode_fast_path.py:

    python3 -m venv /tmp/lcpvenv && /tmp/lcpvenv/bin/pip install llama-cpp-python
    /tmp/lcpvenv/bin/python benchmarks/llama_cpp_decode.py --gguf PATH.gguf \\
        --out benchmarks/results/llama_cpp_decode.json

Decode: an L-token prompt of random ids, then D greedy steps of one token each; tokens/s =
D / time of the steps. Prefill: one N-token prompt evaluated in batches of --n-batch; tokens/s
= N / time. Batch 1 only (the high-level API runs one sequence). The weights are the GGUF's
own (Q4_1 for the embedded model), so this is llama.cpp's speed, not a same-weights ratio.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time
from pathlib import Path


def _decode_tps(llm, context: int, steps: int, seed: int) -> float:
    rng = random.Random(seed)
    llm.reset()
    llm.eval([rng.randrange(100, 40000) for _ in range(context)])
    start = time.perf_counter()
    for _ in range(steps):
        token = llm.sample(top_k=1, temp=0.0)
        llm.eval([token])
    return steps / (time.perf_counter() - start)


def _prefill_tps(llm, length: int, seed: int) -> float:
    rng = random.Random(seed)
    llm.reset()
    prompt = [rng.randrange(100, 40000) for _ in range(length)]
    start = time.perf_counter()
    llm.eval(prompt)
    return length / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--gguf", required=True)
    parser.add_argument("--contexts", type=int, nargs="+", default=[1024, 4096, 8192, 16384])
    parser.add_argument("--prefill-lens", type=int, nargs="+", default=[1024, 4096, 8192])
    parser.add_argument("--decode-steps", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--n-batch", type=int, default=512)
    parser.add_argument("--out", default="benchmarks/results/llama_cpp_decode.json")
    args = parser.parse_args()
    from llama_cpp import Llama
    n_ctx = max(max(args.contexts), max(args.prefill_lens)) + args.decode_steps + 8
    llm = Llama(model_path=args.gguf, n_ctx=n_ctx, n_threads=args.threads,
                n_threads_batch=args.threads, n_batch=args.n_batch, verbose=False)
    samples: dict[str, list[float]] = {}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_suffix(".partial.json")  # what a stopped run had measured
    for rep in range(args.repeats):
        for n in args.contexts:
            samples.setdefault(f"decode/llama_cpp/1/{n}", []).append(
                _decode_tps(llm, n, args.decode_steps, rep))
            print(f"decode context {n}: {samples[f'decode/llama_cpp/1/{n}'][-1]:.1f} tok/s",
                  flush=True)
            partial.write_text(json.dumps(samples))
        for n in args.prefill_lens:
            samples.setdefault(f"prefill/llama_cpp/{n}", []).append(_prefill_tps(llm, n, rep))
            print(f"prefill {n}: {samples[f'prefill/llama_cpp/{n}'][-1]:.1f} tok/s", flush=True)
            partial.write_text(json.dumps(samples))
    result = {"config": vars(args),
              "median_tokens_per_s": {k: statistics.median(v) for k, v in samples.items()},
              "samples": samples}
    out.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
