"""Long-context decode and prefill on one worker: csps (paged in-place attention with the
compiled decode kernel, the same on torch ops, and the gathering reference) vs Hugging Face
transformers on the same weights, in one run (issue 16).

    .venv/bin/python benchmarks/decode_fast_path.py \
        --out benchmarks/results/decode_fast_path.json

Decode: B requests with L-token prompts, then D greedy steps; tokens/s = B * D / time of the
decode steps (csps: engine steps with no prompt tokens; HF: a static batch of B with
past_key_values). Prefill: one request of N tokens in one iteration (vllm policy) vs one HF
forward. Prefix caching is off (the points reuse prompts). Measurements are interleaved per
point; the median of the repeats is reported, and each csps system's ratio over HF. A PNG of
the ratios is written next to the JSON.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import torch
from single_worker import csps_decode_tps, csps_prefill_s, hf_decode_tps, hf_prefill_s
from transformers import LlamaForCausalLM

from csps import LLM
from csps.model.resolve import resolve_model


def _points(args) -> list[tuple[int, int]]:
    """(batch, context) decode points: every context at batch 1, the short ones at batch B."""
    points = [(1, n) for n in args.contexts]
    points += [(b, n) for b in args.batches if b > 1 for n in args.contexts
               if n <= args.max_batched_context]
    return points


def _plot(result: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    ratios = result["ratio_over_hf"]
    fig, ax = plt.subplots(figsize=(10, 4))
    keys = sorted(ratios, key=lambda k: (k.split("/")[0], k.split("/")[1], *map(
        lambda s: int(s) if s.isdigit() else 0, k.split("/")[2:])))
    colors = ["tab:blue" if "/paged/" in k else "tab:gray" for k in keys]
    ax.bar(range(len(keys)), [ratios[k] for k in keys], color=colors)
    ax.axhline(1.0, color="black", lw=0.8)
    ax.axhline(2.0, color="tab:red", lw=0.8, ls="--")
    ax.set_xticks(range(len(keys)), keys, rotation=70, fontsize=7)
    ax.set_ylabel("csps tokens/s / transformers tokens/s")
    ax.set_title("Decode (batch/context) and prefill (length): csps over transformers")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--contexts", type=int, nargs="+", default=[1024, 4096, 8192, 16384])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--max-batched-context", type=int, default=4096,
                        help="batch > 1 only at contexts up to this (memory and time)")
    parser.add_argument("--prefill-lens", type=int, nargs="+", default=[1024, 4096, 8192])
    parser.add_argument("--decode-steps", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--systems", nargs="+", default=["paged", "paged_torch", "reference"])
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads (default: torch's); 1 is steadier on a busy host")
    parser.add_argument("--out", default="benchmarks/results/decode_fast_path.json")
    args = parser.parse_args()
    torch.manual_seed(0)
    if args.threads:
        torch.set_num_threads(args.threads)
    model_dir = resolve_model(args.model)
    max_len = max(max(args.contexts), max(args.prefill_lens)) + args.decode_steps + 8
    systems = {name: LLM(args.model, scheduler="vllm", max_num_batched_tokens=max_len,
                         dtype=args.dtype, max_model_len=max_len, attention_backend=name,
                         kv_cache_memory_bytes=4 << 30, enable_prefix_caching=False)
               for name in args.systems}
    hf = LlamaForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, args.dtype)).eval()
    for llm in systems.values():  # warm-up: first calls pay one-off allocation costs
        csps_prefill_s(llm, 256, seed=99)
    hf_prefill_s(hf, 256, seed=99)
    samples: dict[str, list[float]] = {}
    for rep in range(args.repeats):
        for b, n in _points(args):
            samples.setdefault(f"decode/hf/{b}/{n}", []).append(
                hf_decode_tps(hf, b, n, args.decode_steps, rep))
            for name, llm in systems.items():
                samples.setdefault(f"decode/{name}/{b}/{n}", []).append(
                    csps_decode_tps(llm, b, n, args.decode_steps, rep))
            print(f"decode batch {b} context {n} done", flush=True)
            Path(args.out).with_suffix(".partial.json").write_text(json.dumps(samples))
        for n in args.prefill_lens:
            samples.setdefault(f"prefill/hf/{n}", []).append(n / hf_prefill_s(hf, n, rep))
            for name, llm in systems.items():
                samples.setdefault(f"prefill/{name}/{n}", []).append(
                    n / csps_prefill_s(llm, n, rep))
            print(f"prefill {n} done", flush=True)
    median = {key: statistics.median(values) for key, values in samples.items()}
    ratios = {}  # "decode/paged/16/4096" over "decode/hf/16/4096"
    for key, value in median.items():
        kind, system, *point = key.split("/")
        if system != "hf":
            ratios[key] = value / median["/".join([kind, "hf", *point])]
    result = {"config": vars(args), "torch_threads": torch.get_num_threads(),
              "median_tokens_per_s": median, "ratio_over_hf": ratios, "samples": samples}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    _plot(result, out.with_suffix(".png"))
    for key, value in ratios.items():
        print(f"{key:32s} {median[key]:9.1f} tok/s  csps/hf = {value:.2f}")


if __name__ == "__main__":
    main()
