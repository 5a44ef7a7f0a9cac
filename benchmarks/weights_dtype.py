"""Weight formats on one CPU worker: fp32, bf16 and int8 weight-only (bf16 activations), each
with its accuracy and speed, side by side in one run (issue 16).

    .venv/bin/python benchmarks/weights_dtype.py --out benchmarks/results/weights_dtype.json

Accuracy: mean next-token NLL of the first --nll-tokens tokens of the accuracy harness's text
(benchmarks/csa_accuracy.py: Paul Graham essays), one forward of the model. Speed, through
the engine (csps.LLM, paged attention): batch-1 and batch-16 decode tokens/s at --context
tokens of context, and one --context-token prompt's prefill tokens/s. Ratios are over fp32.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import torch
from csa_accuracy import essay_text
from single_worker import csps_decode_tps, csps_prefill_s

from csps import LLM
from csps.attention.metadata import AttentionMetadata
from csps.model.loader import load_model
from csps.model.resolve import resolve_model
from csps.model.tokenizer import Tokenizer

VARIANTS = {"fp32": ("float32", "none"), "bf16": ("bfloat16", "none"),
            "int8": ("bfloat16", "int8")}


def nll(folder: Path, ids: torch.Tensor, dtype: str, quantization: str) -> float:
    """Mean next-token NLL of ids [n] under the model with these weights."""
    model = load_model(folder, dtype=dtype, quantization=quantization)
    metadata = AttentionMetadata.build([(0, len(ids), list(range(-(-len(ids) // 16))))], 16,
                                       "cpu")
    with torch.inference_mode():
        hidden = model(ids, torch.arange(len(ids)), None, metadata)
        logp = torch.log_softmax(model.compute_logits(hidden[:-1]), dim=-1)
    return -logp.gather(1, ids[1:, None]).mean().item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--nll-tokens", type=int, default=2048)
    parser.add_argument("--context", type=int, default=1024)
    parser.add_argument("--decode-steps", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", default="benchmarks/results/weights_dtype.json")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    folder = resolve_model(args.model)
    ids = torch.tensor(Tokenizer(folder).encode(essay_text(), add_special_tokens=False)
                       [:args.nll_tokens])
    result: dict = {"config": vars(args), "torch_threads": torch.get_num_threads(),
                    "nll": {}, "tokens_per_s": {}, "samples": {}}
    for name, (dtype, quantization) in VARIANTS.items():
        result["nll"][name] = nll(folder, ids, dtype, quantization)
    engines = {name: LLM(args.model, scheduler="vllm", dtype=dtype, quantization=quantization,
                         max_num_batched_tokens=args.context + 64,
                         max_model_len=args.context + 64, kv_cache_memory_bytes=2 << 30)
               for name, (dtype, quantization) in VARIANTS.items()}
    for llm in engines.values():
        csps_prefill_s(llm, 128, seed=99)
    for rep in range(args.repeats):
        for name, llm in engines.items():
            for b in (1, 16):
                result["samples"].setdefault(f"decode/{name}/{b}", []).append(
                    csps_decode_tps(llm, b, args.context, args.decode_steps, rep))
            result["samples"].setdefault(f"prefill/{name}", []).append(
                args.context / csps_prefill_s(llm, args.context, rep))
    median = {k: statistics.median(v) for k, v in result["samples"].items()}
    result["tokens_per_s"] = median
    result["ratio_over_fp32"] = {k: v / median[k.replace(k.split("/")[1], "fp32", 1)]
                                 for k, v in median.items() if "/fp32" not in k}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    for name, value in result["nll"].items():
        print(f"NLL {name}: {value:.4f}")
    for key, value in median.items():
        print(f"{key:20s} {value:9.1f} tok/s  x{result['ratio_over_fp32'].get(key, 1.0):.2f}")


if __name__ == "__main__":
    main()
