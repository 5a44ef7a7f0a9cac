"""Request traces read from files: Mooncake JSONL, Azure LLM inference CSV, Sarathi/Vidur CSV.

Each format becomes a list of TraceRecord (arrival time in seconds from the first request,
prompt and output lengths in tokens, Mooncake's prefix block hashes); `scale_records` stretches
time and lengths. No torch.
"""

from __future__ import annotations

import csv
import json
import re
from dataclasses import dataclass, replace
from datetime import datetime
from pathlib import Path

TRACE_FORMATS = ("mooncake", "azure", "sarathi")
MOONCAKE_BLOCK_TOKENS = 512  # tokens per Mooncake hash_id block


@dataclass(frozen=True, slots=True)
class TraceRecord:
    timestamp_s: float | None  # arrival, seconds after the trace's first request; None: untimed
    input_len: int  # prompt tokens
    output_len: int  # generated tokens
    hash_ids: tuple[int, ...] = ()  # Mooncake: one id per prefix block; equal ids = equal text


def detect_format(path: str | Path) -> str:
    """The format of a trace file from its suffix and header; ValueError if unknown."""
    path = Path(path)
    if path.suffix in (".jsonl", ".json"):
        return "mooncake"
    with path.open(newline="") as file:
        header = next(csv.reader(file), [])
    if {"TIMESTAMP", "ContextTokens", "GeneratedTokens"} <= set(header):
        return "azure"
    if {"num_prefill_tokens", "num_decode_tokens"} <= set(header):
        return "sarathi"
    raise ValueError(f"{path}: unknown trace format (header {header[:5]}); expected one of "
                     f"{', '.join(TRACE_FORMATS)} (Mooncake .jsonl, Azure or Sarathi CSV)")


def read_trace(path: str | Path, trace_format: str | None = None) -> list[TraceRecord]:
    """All records of a trace file, timestamps made relative to the earliest one."""
    trace_format = trace_format or detect_format(path)
    readers = {"mooncake": _read_mooncake, "azure": _read_azure, "sarathi": _read_sarathi}
    if trace_format not in readers:
        raise ValueError(f"trace format must be one of {TRACE_FORMATS}, got {trace_format!r}")
    records = readers[trace_format](Path(path))
    if not records:
        raise ValueError(f"{path}: the trace has no requests")
    times = [r.timestamp_s for r in records if r.timestamp_s is not None]
    start = min(times, default=0.0)
    return [r if r.timestamp_s is None else replace(r, timestamp_s=r.timestamp_s - start)
            for r in records]


def scale_records(records: list[TraceRecord], time_scale: float = 1.0, length_scale: float = 1.0,
                  max_input_len: int | None = None) -> list[TraceRecord]:
    """Inter-arrival times times `time_scale`; lengths times `length_scale` (at least 1 token),
    prompts then clipped to `max_input_len`."""
    if not time_scale > 0 or not length_scale > 0:
        raise ValueError(f"time_scale and length_scale must be > 0, got {time_scale}, "
                         f"{length_scale}")

    def length(n: int, limit: int | None = None) -> int:
        scaled = max(1, round(n * length_scale))
        return scaled if limit is None else min(scaled, limit)

    return [TraceRecord(None if r.timestamp_s is None else r.timestamp_s * time_scale,
                        length(r.input_len, max_input_len), length(r.output_len), r.hash_ids)
            for r in records]


def _read_mooncake(path: Path) -> list[TraceRecord]:
    records = []
    with path.open() as file:
        for line_no, line in enumerate(file, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                records.append(TraceRecord(float(row["timestamp"]) / 1000.0,
                                           int(row["input_length"]), int(row["output_length"]),
                                           tuple(int(h) for h in row.get("hash_ids", ()))))
            except (ValueError, KeyError, TypeError) as exc:
                raise ValueError(f"{path}:{line_no}: bad Mooncake record ({exc!r})") from None
    return records


def _read_azure(path: Path) -> list[TraceRecord]:
    return [TraceRecord(_datetime_s(row["TIMESTAMP"]), int(row["ContextTokens"]),
                        int(row["GeneratedTokens"])) for row in _csv_rows(path)]


def _read_sarathi(path: Path) -> list[TraceRecord]:
    return [TraceRecord(float(row["arrived_at"]) if row.get("arrived_at") else None,
                        int(float(row["num_prefill_tokens"])),
                        int(float(row["num_decode_tokens"]))) for row in _csv_rows(path)]


def _csv_rows(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as file:
        return list(csv.DictReader(file))


def _datetime_s(text: str) -> float:
    """Seconds since the epoch of '2023-11-16 18:15:46.6805900' (any number of fraction
    digits, which datetime.fromisoformat does not accept before Python 3.11)."""
    match = re.fullmatch(r"\s*([^.]+?)(\.\d+)?\s*", text)
    if match is None:
        raise ValueError(f"bad trace timestamp {text!r}")
    whole = datetime.fromisoformat(match.group(1)).timestamp()
    return whole + (float(match.group(2)) if match.group(2) else 0.0)
