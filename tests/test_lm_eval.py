"""lm-evaluation-harness against the real server: its `local-completions` model through
`python -m csps.server` and its `hf` model on the same weights must score the tasks of
benchmarks/lm_eval_compare.py alike (issue 15): the same accuracy, the same choice per example,
the same generated texts."""

from __future__ import annotations

import importlib.util
import time
from pathlib import Path

import pytest

pytest.importorskip("lm_eval")
pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(importlib.util.find_spec("needlehaystack") is None,
                                 reason="needlehaystack is not installed")]

ROOT = Path(__file__).resolve().parents[1]


def _load_script():
    spec = importlib.util.spec_from_file_location("lm_eval_compare",
                                                  ROOT / "benchmarks" / "lm_eval_compare.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_local_completions_scores_like_hf(real_model_dir, tmp_path):
    bench = _load_script()
    task_dir = bench.write_tasks(tmp_path, num_mc=12, num_gen=2)
    tasks = [bench.MC_TASK, bench.GEN_TASK]
    start = time.perf_counter()
    with bench.CspsServer(real_model_dir, max_model_len=1024) as server:
        args = bench.model_args("local-completions", real_model_dir, server.base_url,
                                max_length=1024)
        csps = bench.run_lm_eval("local-completions", args, task_dir, tasks)
    hf = bench.run_lm_eval("hf", bench.model_args("hf", real_model_dir), task_dir, tasks)
    print(f"lm-eval csps {csps['time_s']} s, hf {hf['time_s']} s, "
          f"total {time.perf_counter() - start:.1f} s")

    for metric in ("acc", "acc_norm"):
        assert csps["metrics"][bench.MC_TASK][metric] == hf["metrics"][bench.MC_TASK][metric]
    mc = bench.compare_mc(csps["samples"][bench.MC_TASK], hf["samples"][bench.MC_TASK])
    assert mc["num_examples"] == 12
    assert mc["same_choice"] == 12 and mc["same_is_greedy"] == 12
    assert mc["max_abs_loglikelihood_diff"] < 1e-2  # float32 on both sides, ~1e-4 seen
    gen = bench.compare_gen(csps["samples"][bench.GEN_TASK], hf["samples"][bench.GEN_TASK])
    assert gen["same_text"] == gen["num_examples"] == 2
    assert (csps["metrics"][bench.GEN_TASK]["exact_match"]
            == hf["metrics"][bench.GEN_TASK]["exact_match"])
