"""Model shapes the simulator knows by name: HF-style config.json files in `models/`, written
from the published model cards' numbers (each file's `_source` says which). No torch.

`model_shape("llama-3-70b")` or `model_shape("path/to/config.json")`; names are matched without
case, and a few spellings of the same model (`Llama-2-7B`, `meta-llama/Llama-2-7b-hf`) resolve.
"""

from __future__ import annotations

import json
from pathlib import Path

from csps.costmodel.shape import ModelShape

MODELS_DIR = Path(__file__).with_name("models")
ALIASES = {"llama-2-7b-hf": "llama-2-7b", "meta-llama-3-8b": "llama-3-8b",
           "llama-3-8b-instruct-262k": "llama-3-8b-262k", "mistral-7b-v0.1": "mistral-7b",
           "yi-34b": "yi-34b-200k", "meta-llama-3-70b": "llama-3-70b", "lwm-1m": "lwm-text-1m"}


def model_names() -> list[str]:
    return sorted(p.stem for p in MODELS_DIR.glob("*.json"))


def model_config_path(name_or_path: str | Path) -> Path:
    """The config.json of a bundled model name, or the given file / folder (its config.json)."""
    path = Path(name_or_path)
    if path.is_dir():
        path = path / "config.json"
    if path.is_file():
        return path
    key = str(name_or_path).strip().lower().split("/")[-1]
    key = ALIASES.get(key, key)
    bundled = MODELS_DIR / f"{key}.json"
    if not bundled.is_file():
        raise ValueError(f"unknown model {str(name_or_path)!r}: not a config.json file or folder, "
                         f"and not one of {model_names()}")
    return bundled


def model_config(name_or_path: str | Path) -> dict:
    return json.loads(model_config_path(name_or_path).read_text())


def model_shape(name_or_path: str | Path, dtype_bytes: int = 2) -> ModelShape:
    path = model_config_path(name_or_path)
    return ModelShape.from_config_file(path, dtype_bytes=dtype_bytes)


def max_position_embeddings(name_or_path: str | Path) -> int:
    """The model's context length (the simulator's default max_model_len)."""
    return int(model_config(name_or_path)["max_position_embeddings"])
