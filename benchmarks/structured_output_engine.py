"""Structured output in the engine: JSON-schema requests against plain ones, side by side in one
run on the same engine (SmolLM2-135M, fp32, CPU), issue 15.

    PYTHONPATH=. .venv/bin/python benchmarks/structured_output_engine.py \
        --out benchmarks/results/structured_output_engine.json

Batches of `--n` samples of one chat prompt, each `--tokens` tokens (ignore_eos, so every
batch decodes the same number of tokens; after a grammar completes it allows only EOS),
alternating plain and json_schema `--repeats` times. Reports the median seconds per output
token of each kind, the grammar's overhead per token (schema minus plain, medians) with the
spread of the plain runs (the machine's noise), and whether every constrained output sampled
to its own end validates (`--tries` samples at temperature 1). Whole steps are noisier than the
grammar's cost, so the sampler is also timed alone: 8 rows of random [V] logits per call,
temperature 1, plain vs json_object, median microseconds per row.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import jsonschema
import torch

from csps import LLM, SamplingParams
from csps.contract.sampling import SamplingContext
from csps.contract.step import ScheduledRequest
from csps.engine.grammar_book import GrammarBook
from csps.engine.sampler import Sampler
from csps.model.resolve import resolve_model
from csps.request import StructuredOutputsParams

SCHEMA = {"type": "object", "properties": {
    "name": {"type": "string", "maxLength": 20},
    "age": {"type": "integer", "minimum": 0, "maximum": 120},
    "colour": {"enum": ["red", "green", "blue"]},
    "tags": {"type": "array", "items": {"type": "string", "maxLength": 10}, "maxItems": 3}},
    "required": ["name", "age", "colour", "tags"], "additionalProperties": False}


def timed(llm: LLM, ids: list[int], params: SamplingParams) -> tuple[float, list]:
    start = time.perf_counter()
    out = llm.generate([ids], params)[0]
    return time.perf_counter() - start, out.outputs


def sampler_us_per_row(model_dir: str, vocab_size: int, grammar: StructuredOutputsParams | None,
                       steps: int = 40, rows: int = 8) -> float:
    book = GrammarBook(model_dir, vocab_size)
    sampler = Sampler(0, grammars=book)
    params = SamplingParams(temperature=1.0, seed=1, structured_outputs=grammar)
    outputs: dict[str, list[int]] = {f"r{i}": [] for i in range(rows)}
    times = []
    for _ in range(steps):
        requests = [ScheduledRequest(rid, [0], 1, [], params, True,
                                     sampling_context=SamplingContext(tuple(ids)))
                    for rid, ids in outputs.items()]
        logits = torch.randn(rows, vocab_size)  # [rows, V]
        start = time.perf_counter()
        out = sampler.sample(logits, requests)
        times.append((time.perf_counter() - start) / rows)
        for rid, token in out.sampled.items():
            outputs[rid].append(token)
    return statistics.median(times) * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--n", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=48)
    parser.add_argument("--tries", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", type=Path,
                        default=Path("benchmarks/results/structured_output_engine.json"))
    args = parser.parse_args()
    llm = LLM(args.model, max_model_len=1024, kv_cache_memory_bytes=1 << 28)
    ids = llm.get_tokenizer().apply_chat_template(
        [{"role": "user", "content": "Describe a person as JSON."}])
    grammar = StructuredOutputsParams(json=json.dumps(SCHEMA))
    base = dict(n=args.n, temperature=1.0, seed=0, max_tokens=args.tokens, ignore_eos=True)
    timed(llm, ids, SamplingParams(**base))  # warm-up (and the grammar compiler below)
    timed(llm, ids, SamplingParams(**base, structured_outputs=grammar))
    runs: dict[str, list[float]] = {"plain": [], "json_schema": []}
    for _ in range(args.repeats):
        for name, params in [("plain", SamplingParams(**base)),
                             ("json_schema", SamplingParams(**base, structured_outputs=grammar))]:
            seconds, outputs = timed(llm, ids, params)
            runs[name].append(seconds / sum(len(c.token_ids) for c in outputs))
    plain, schema = statistics.median(runs["plain"]), statistics.median(runs["json_schema"])
    model_dir = str(resolve_model(args.model))
    vocab = llm.llm_engine.arch.vocab_size
    sampler_rows = {"plain": [], "json_object": []}
    for _ in range(args.repeats):
        sampler_rows["plain"].append(sampler_us_per_row(model_dir, vocab, None))
        sampler_rows["json_object"].append(
            sampler_us_per_row(model_dir, vocab, StructuredOutputsParams(json_object=True)))
    _, outputs = timed(llm, ids, SamplingParams(n=args.tries, temperature=1.0, seed=1,
                                                max_tokens=200, structured_outputs=grammar))
    valid = 0
    for c in outputs:
        try:
            jsonschema.validate(json.loads(c.text), SCHEMA)
            valid += 1
        except (ValueError, jsonschema.ValidationError):
            pass
    result = {"n": args.n, "tokens": args.tokens, "repeats": args.repeats,
              "s_per_token": runs, "median_s_per_token": {"plain": plain, "json_schema": schema},
              "grammar_overhead_us_per_token": (schema - plain) * 1e6,
              "grammar_overhead_ratio": schema / plain,
              "plain_spread_ratio": max(runs["plain"]) / min(runs["plain"]),
              "sampler_us_per_row": {k: statistics.median(v) for k, v in sampler_rows.items()},
              "valid": valid, "tries": args.tries, "schema": SCHEMA}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(json.dumps({k: v for k, v in result.items() if k != "schema"}, indent=2))


if __name__ == "__main__":
    main()
