"""Benchmark client for OpenAI-compatible servers (`csps bench serve` / `csps bench compare`).

The workload (arrivals, traces), metrics and comparison modules are pure Python (no torch), so
the simulator can share them; only prompt building loads a tokenizer.
"""
