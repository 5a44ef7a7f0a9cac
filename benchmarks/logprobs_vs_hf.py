"""Logprobs of csps against transformers' log-softmax on the same weights (fp32, CPU), issue 15.

    PYTHONPATH=. .venv/bin/python benchmarks/logprobs_vs_hf.py \
        --out benchmarks/results/logprobs_vs_hf.json

One document prompt (this repo's docs, `--prompt-len` tokens) is scored by csps with greedy
logprobs (top `--top`) for `--tokens` generated tokens and prompt logprobs for every prompt
token, on one worker (prefill chunked by `--chunk`) and under SP over 2 workers; transformers
runs the same ids in one forward. Reports the largest absolute difference of the chosen tokens'
logprobs, of the top-k logprobs, and rank disagreements, per deployment, as JSON.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from transformers import LlamaForCausalLM

from csps import LLM, SamplingParams
from csps.model.resolve import resolve_model
from csps.model.tokenizer import Tokenizer


def compare(output, prompt_ids: list[int], reference: torch.Tensor) -> dict:
    """reference [L + T, V]: the log-softmax after each position."""
    chosen, top, ranks = 0.0, 0.0, 0
    num_prompt = len(prompt_ids)
    for pos in range(1, num_prompt):
        entry, token = output.prompt_logprobs[pos], prompt_ids[pos]
        want = reference[pos - 1]
        chosen = max(chosen, abs(entry[token].logprob - float(want[token])))
        ranks += entry[token].rank != int((want > want[token]).sum()) + 1
    completion = output.outputs[0]
    for i, (token, entry) in enumerate(zip(completion.token_ids, completion.logprobs,
                                           strict=True)):
        want = reference[num_prompt - 1 + i]
        chosen = max(chosen, abs(entry[token].logprob - float(want[token])))
        for t, lp in entry.items():
            top = max(top, abs(lp.logprob - float(want[t])))
    return {"max_abs_diff_chosen": chosen, "max_abs_diff_top": top, "rank_mismatches": ranks,
            "positions": num_prompt - 1 + len(completion.token_ids)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--prompt-len", type=int, default=600)
    parser.add_argument("--tokens", type=int, default=16)
    parser.add_argument("--top", type=int, default=5)
    parser.add_argument("--chunk", type=int, default=128)
    parser.add_argument("--out", type=Path,
                        default=Path("benchmarks/results/logprobs_vs_hf.json"))
    args = parser.parse_args()
    model_dir = resolve_model("smollm2-135m")
    root = Path(__file__).resolve().parents[1]
    text = (root / "docs/architecture.md").read_text()
    prompt_ids = Tokenizer(model_dir).encode(text)[:args.prompt_len]
    params = SamplingParams(temperature=0, max_tokens=args.tokens, ignore_eos=True,
                            logprobs=args.top, prompt_logprobs=args.top)
    results = {}
    deployments = {"one_worker_chunked": dict(scheduler="sarathi",
                                              max_num_batched_tokens=args.chunk),
                   "sp2": dict(sequence_parallel_size=2, long_prompt_threshold=256)}
    outputs = {}
    for name, kwargs in deployments.items():
        llm = LLM(str(model_dir), max_model_len=2048, kv_cache_memory_bytes=1 << 27, **kwargs)
        outputs[name] = llm.generate([prompt_ids], params)[0]
        llm.llm_engine.shutdown()
    hf = LlamaForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    for name, output in outputs.items():
        ids = prompt_ids + output.outputs[0].token_ids
        with torch.inference_mode():
            reference = hf(torch.tensor([ids])).logits[0].log_softmax(-1)
        results[name] = compare(output, prompt_ids, reference)
    result = {"prompt_len": len(prompt_ids), "tokens": args.tokens, "top": args.top,
              "dtype": "float32", "results": results}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
