"""Grammar-constrained decoding on CPU: xgrammar vs llguidance on the SmolLM2 tokenizer (issue 15).

    pip install xgrammar  # not a csps dependency; without it only llguidance rows are run
    PYTHONPATH=. .venv/bin/python benchmarks/grammar_mask.py \
        --out benchmarks/results/grammar_mask.json

For each library and grammar (json_object = schema {"type": "object"}, as vLLM compiles it;
a realistic schema with a string, an integer, an enum and an array of strings, all required),
times the compile (tokenizer set up once, fresh compiler or matcher per repeat) and then walks
a valid JSON instance, tokenized by the model's tokenizer and ended by EOS, token by token.
Per token: fill the allowed-token bitmask, apply it to a fp32 logits row of the model's vocab
size (csps's own apply, the same for both), advance the matcher. Median and p90 over all
tokens of all walks are reported, with each part's median, as JSON plus a PNG bar chart.
Both libraries run with their defaults; the third row, "csps", is the engine's own
RequestGrammar (llguidance, whitespace runs capped, cache off so every compile is cold).
"""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import json
import os
import statistics
import time
from pathlib import Path

import torch
from transformers import AutoTokenizer

from csps.engine.token_bitmask import apply_token_bitmask, bitmask_words
from csps.model.resolve import resolve_model

SCHEMA = {"type": "object", "properties": {
    "name": {"type": "string"}, "age": {"type": "integer"},
    "status": {"enum": ["active", "inactive", "pending"]},
    "skills": {"type": "array", "items": {"type": "string"}}},
    "required": ["name", "age", "status", "skills"]}
GRAMMARS = {  # name -> (schema, a valid instance to walk)
    "json_object": ({"type": "object"}, {
        "id": 17, "title": "Quarterly report", "tags": ["finance", "q3"], "score": 4.5,
        "author": {"name": "Ada Lovelace", "email": "ada@example.com"}, "draft": False}),
    "json_schema": (SCHEMA, {"name": "Grace Hopper", "age": 85, "status": "active",
                             "skills": ["COBOL", "compilers", "teaching"]}),
}


class _Walker:
    """One matcher of a raw library, with its bitmask buffer."""

    def __init__(self, matcher, fill, accept, vocab_size: int) -> None:
        self.matcher, self._fill, self._accept = matcher, fill, accept
        self.bitmask = torch.zeros(bitmask_words(vocab_size), dtype=torch.int32)  # [W]

    def fill(self) -> torch.Tensor:
        self._fill(self.matcher, self.bitmask)
        return self.bitmask

    def apply(self, row: torch.Tensor, bitmask: torch.Tensor) -> None:
        apply_token_bitmask(row, bitmask)

    def accept(self, token_id: int) -> bool:
        return self._accept(self.matcher, token_id)


class Llguidance:  # library defaults: unbounded whitespace
    def __init__(self, folder: Path, hf, vocab_size: int, threads: int) -> None:
        import llguidance
        import llguidance.hf
        self.llg, self.vocab_size = llguidance, vocab_size
        self.tokenizer = llguidance.hf.from_tokenizer(hf, n_vocab=vocab_size)

    def compile(self, schema: dict) -> _Walker:
        grammar = self.llg.LLMatcher.grammar_from_json_schema(json.dumps(schema))
        matcher = self.llg.LLMatcher(self.tokenizer, grammar, log_level=0)
        assert not matcher.is_error(), matcher.get_error()
        return _Walker(matcher, lambda m, b: m.unsafe_compute_mask_ptr(b.data_ptr(), b.numel() * 4),
                       lambda m, t: m.consume_token(t), self.vocab_size)


class Xgrammar:  # library defaults: any_whitespace
    def __init__(self, folder: Path, hf, vocab_size: int, threads: int) -> None:
        import xgrammar
        self.xgr, self.threads, self.vocab_size = xgrammar, threads, vocab_size
        self.info = xgrammar.TokenizerInfo.from_huggingface(hf, vocab_size=vocab_size)

    def compile(self, schema: dict) -> _Walker:  # a fresh compiler: no compile cache hit
        compiler = self.xgr.GrammarCompiler(self.info, max_threads=self.threads,
                                            cache_enabled=False)
        matcher = self.xgr.GrammarMatcher(compiler.compile_json_schema(json.dumps(schema)))
        return _Walker(matcher, lambda m, b: m.fill_next_token_bitmask(b.view(1, -1), 0),
                       lambda m, t: m.accept_token(t), self.vocab_size)


class Csps:  # csps.engine.structured_output as the engine uses it (llguidance, capped ws)
    def __init__(self, folder: Path, hf, vocab_size: int, threads: int) -> None:
        from csps.engine.structured_output import GrammarCompiler
        self.compiler = GrammarCompiler(folder, vocab_size, cache_size=0)  # every compile cold

    def compile(self, schema: dict):
        from csps.request import StructuredOutputsParams
        grammar = self.compiler.compile(StructuredOutputsParams(json=json.dumps(schema)))
        grammar.fill, grammar.apply = grammar.compute_bitmask, grammar.apply_mask
        return grammar


LIBRARIES = {"llguidance": Llguidance, "xgrammar": Xgrammar, "csps": Csps}
_MODULE = {"csps": "llguidance"}  # a library not installed is left out (xgrammar: dev only)


def _walk(walker, token_ids: list[int], vocab_size: int) -> list[tuple[float, ...]]:
    """(fill, apply, accept) seconds for each token of one walk."""
    logits = torch.randn(vocab_size)  # [V] fp32
    times = []
    for token_id in token_ids:
        row = logits.clone()
        t0 = time.perf_counter()
        bitmask = walker.fill()
        t1 = time.perf_counter()
        walker.apply(row, bitmask)
        t2 = time.perf_counter()
        if walker.accept(token_id) is False:
            raise RuntimeError(f"{type(walker).__name__} rejected token {token_id}")
        times.append((t1 - t0, t2 - t1, time.perf_counter() - t2))
        assert row[token_id] > float("-inf"), "the walked token was masked"
    return times


def _p(values: list[float], q: float) -> float:
    return sorted(values)[min(len(values) - 1, int(q * len(values)))]


def measure(lib_cls, folder: Path, hf, vocab_size: int, args) -> dict:
    t0 = time.perf_counter()
    lib = lib_cls(folder, hf, vocab_size, args.compile_threads)
    out = {"setup_s": time.perf_counter() - t0}  # import + tokenizer tables, once a process
    for name, (schema, instance) in GRAMMARS.items():
        token_ids = hf.encode(json.dumps(instance), add_special_tokens=False)
        token_ids.append(hf.eos_token_id)
        compile_s, steps = [], []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            walker = lib.compile(schema)
            compile_s.append(time.perf_counter() - t0)
            steps.extend(_walk(walker, token_ids, vocab_size))
        us = {part: [s[i] * 1e6 for s in steps] for i, part in
              enumerate(("fill", "apply", "accept"))}
        total = [sum(s) * 1e6 for s in steps]
        out[name] = {"compile_ms_median": statistics.median(compile_s) * 1e3,
                     "compile_ms_first": compile_s[0] * 1e3, "tokens": len(token_ids),
                     "mask_us_median": statistics.median(total), "mask_us_p90": _p(total, 0.9),
                     "mask_us_max": max(total),
                     **{f"{k}_us_median": statistics.median(v) for k, v in us.items()},
                     **{f"{k}_us_p90": _p(v, 0.9) for k, v in us.items()}}
        print(type(lib).__name__, name, json.dumps(out[name]), flush=True)
    return out


def _plot(result: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    libs, names = list(result["libraries"]), list(GRAMMARS)
    fig, (ax_mask, ax_compile) = plt.subplots(1, 2, figsize=(11, 4))
    width = 0.8 / len(libs)
    for i, lib in enumerate(libs):
        rows = [result["libraries"][lib][n] for n in names]
        xs = [j + i * width for j in range(len(names))]
        ax_mask.bar(xs, [r["mask_us_p90"] for r in rows], width, alpha=0.35,
                    color=f"C{i}", label=f"{lib} p90")
        ax_mask.bar(xs, [r["mask_us_median"] for r in rows], width, color=f"C{i}",
                    label=f"{lib} median")
        ax_compile.bar(xs, [r["compile_ms_median"] for r in rows], width, color=f"C{i}",
                       label=lib)
    for ax, label in ((ax_mask, "µs per token (fill + apply + accept)"),
                      (ax_compile, "compile, ms (median)")):
        ax.set_xticks([j + width * (len(libs) - 1) / 2 for j in range(len(names))], names)
        ax.set_ylabel(label)
        ax.margins(y=0.3)
        ax.legend(fontsize=7, ncol=3, loc="upper center")
    fig.suptitle(f"Grammar mask on CPU, SmolLM2 tokenizer, V={result['config']['vocab_size']}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads for the apply (more spike on a shared CPU)")
    parser.add_argument("--compile-threads", type=int, default=min(8, os.cpu_count() or 1),
                        help="xgrammar compile threads")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/grammar_mask.json"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    folder = resolve_model(args.model)
    hf = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    vocab_size = json.loads((folder / "config.json").read_text())["vocab_size"]
    result = {"config": {"model": args.model, "vocab_size": vocab_size,
                         "tokenizer_vocab": len(hf), "repeats": args.repeats,
                         "threads": args.threads,
                         "compile_threads": args.compile_threads, "cpu_count": os.cpu_count(),
                         "versions": {p: importlib.metadata.version(p) for p in
                                      ("llguidance", "xgrammar", "torch")
                                      if importlib.util.find_spec(p)}},
              "libraries": {name: measure(cls, folder, hf, vocab_size, args)
                            for name, cls in LIBRARIES.items()
                            if importlib.util.find_spec(_MODULE.get(name, name))}}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    _plot(result, args.out.with_suffix(".png"))
    print(f"wrote {args.out} and {args.out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
