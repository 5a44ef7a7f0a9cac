"""Load an HF folder (config.json + *.safetensors, sharded or not) into a model on a device."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors import safe_open

from csps.attention.backend import AttentionBackend, get_attention_backend
from csps.layers.quantization import QUANTIZATIONS, quantize_model_int8_
from csps.model.arch_config import LlamaArchConfig
from csps.model.registry import get_model_class

if TYPE_CHECKING:
    from csps.parallel.sp_tp import TensorParallelContext

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def read_arch_config(folder: str | Path) -> LlamaArchConfig:
    """LlamaArchConfig of an HF folder; FileNotFoundError if it has no config.json."""
    path = Path(folder) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"no config.json in {folder}")
    return LlamaArchConfig.from_hf_dict(json.loads(path.read_text()))


def safetensors_files(folder: str | Path) -> list[Path]:
    """The weight files: those the index names when there is one, else every *.safetensors."""
    folder = Path(folder)
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        files = [folder / name for name in names]
    else:
        files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors weights in {folder}")
    return files


def iterate_weights(folder: str | Path) -> Iterator[tuple[str, torch.Tensor]]:
    """(HF name, CPU tensor) for every tensor of the folder, one at a time."""
    for path in safetensors_files(folder):
        with safe_open(str(path), framework="pt", device="cpu") as f:
            for name in f.keys():  # noqa: SIM118 (safe_open is not a dict)
                yield name, f.get_tensor(name)


def load_model(folder: str | Path, dtype: torch.dtype | str = torch.float32,
               device: torch.device | str = "cpu",
               attn_backend_name: str = "reference",
               attn_backend: AttentionBackend | None = None,
               tp: TensorParallelContext | None = None,
               quantization: str = "none") -> torch.nn.Module:
    """A ready (eval-mode) model with the folder's weights in `dtype` on `device`.

    dtype: a torch dtype or "float32" / "bfloat16" / "float16". The model's forward takes
    (input_ids [T], positions [T], kv_caches, AttentionMetadata) and returns hidden [T, H];
    compute_logits(hidden [N, H]) gives float32 logits [N, V].

    The attention backend is a new get_attention_backend(attn_backend_name), or `attn_backend`
    when given: an instance built by the caller, e.g. parallel.sp_attention's
    SequenceParallelAttention, which needs its process group and cannot be built by name.
    With `tp` (parallel.sp_tp.TensorParallelContext) the model holds this TP rank's weight
    shard and runs SP-TP; the forward contract is unchanged. quantization "int8": weight-only
    int8 linear layers and LM head (layers/quantization.py), activations in `dtype`.
    """
    if quantization not in QUANTIZATIONS:
        raise ValueError(f"quantization must be one of {QUANTIZATIONS}, got {quantization!r}")
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {list(DTYPES)}, got {dtype!r}")
        dtype = DTYPES[dtype]
    config = read_arch_config(folder)
    model_cls = get_model_class(config.architectures)
    # Build without allocating (meta device), then allocate once in the target dtype/device.
    with torch.device("meta"):
        backend = attn_backend or get_attention_backend(attn_backend_name)
        model = model_cls(config, backend, tp=tp)
    model = model.to(dtype=dtype).to_empty(device=device)
    model.load_weights(iterate_weights(folder))
    if quantization == "int8":
        quantize_model_int8_(model)
    return model.eval()
