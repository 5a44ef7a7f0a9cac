"""Convert a llama-architecture GGUF file into an HF folder (config.json, model.safetensors,
tokenizer files), dequantizing to float32 and undoing llama.cpp's Q/K row permutation.

The folder is written under a temporary name and renamed when complete, so a partial
conversion is never mistaken for a finished one. CONVERSION_MARKER records the source file.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import torch
from gguf import GGUFReader
from gguf.quants import dequantize
from safetensors.torch import save_file
from tqdm import tqdm

from csps.model.gguf_tokenizer import write_tokenizer

CONVERSION_MARKER = "csps_conversion.json"
FORMAT_VERSION = 1  # bump to invalidate caches written by older converters

_LAYER_TENSORS = {  # GGUF blk.N.<key> -> HF model.layers.N.<value>
    "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_GLOBAL_TENSORS = {"token_embd": "model.embed_tokens", "output_norm": "model.norm",
                   "output": "lm_head"}


def gguf_metadata(reader: GGUFReader) -> dict:
    """Scalar and string metadata of a GGUF file (vocabulary arrays left out)."""
    out = {}
    for key, field in reader.fields.items():
        if key.startswith("tokenizer.ggml.") and key.rsplit(".", 1)[1] in (
                "tokens", "scores", "token_type", "merges"):
            continue
        out[key] = field.contents()
    return out


def hf_config_from_gguf(meta: dict, tensor_names: set[str]) -> dict:
    """An HF LlamaForCausalLM config.json dict from GGUF `llama.*` metadata."""
    arch = meta.get("general.architecture")
    if arch != "llama":
        raise ValueError(f"only llama-architecture GGUF files are supported, got {arch!r}")
    if "rope_freqs.weight" in tensor_names:
        raise ValueError("GGUF has rope_freqs (Llama 3.1-style rope scaling), not supported")

    def get(key, default=None):
        return meta.get(f"llama.{key}", default)

    num_heads = get("attention.head_count")
    hidden = get("embedding_length")
    head_dim = get("attention.key_length") or hidden // num_heads
    if get("rope.dimension_count", head_dim) != head_dim:
        raise ValueError("partial rotary embeddings are not supported")
    theta = float(get("rope.freq_base", 10000.0))
    scaling = None
    scaling_type = get("rope.scaling.type", "none")
    if scaling_type == "linear":
        scaling = {"rope_type": "linear", "factor": float(get("rope.scaling.factor"))}
    elif scaling_type != "none":
        raise ValueError(f"unsupported GGUF rope scaling {scaling_type!r}")
    vocab_size = get("vocab_size") or int(meta.get("tokenizer.ggml.token_count", 0)) or None
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "vocab_size": vocab_size, "hidden_size": hidden,
        "intermediate_size": get("feed_forward_length"),
        "num_hidden_layers": get("block_count"), "num_attention_heads": num_heads,
        "num_key_value_heads": get("attention.head_count_kv", num_heads), "head_dim": head_dim,
        "hidden_act": "silu", "rms_norm_eps": float(np.format_float_positional(
            np.float32(get("attention.layer_norm_rms_epsilon", 1e-5)), trim="-")),
        # Both spellings: transformers 4.x reads rope_theta/rope_scaling, 5.x rope_parameters.
        "rope_theta": theta, "rope_scaling": scaling,
        "rope_parameters": {"rope_type": "default", **(scaling or {}), "rope_theta": theta},
        "max_position_embeddings": get("context_length", 2048),
        "tie_word_embeddings": "output.weight" not in tensor_names,
        "bos_token_id": meta.get("tokenizer.ggml.bos_token_id"),
        "eos_token_id": meta.get("tokenizer.ggml.eos_token_id"),
        "attention_bias": False, "mlp_bias": False, "torch_dtype": "float32",
    }


def hf_tensor_name(gguf_name: str) -> str:
    """'blk.3.attn_q.weight' -> 'model.layers.3.self_attn.q_proj.weight'; ValueError if unknown."""
    parts = gguf_name.split(".")
    if parts[0] == "blk" and len(parts) == 4 and parts[2] in _LAYER_TENSORS:
        return f"model.layers.{parts[1]}.{_LAYER_TENSORS[parts[2]]}.{parts[3]}"
    if len(parts) == 2 and parts[0] in _GLOBAL_TENSORS:
        return f"{_GLOBAL_TENSORS[parts[0]]}.{parts[1]}"
    raise ValueError(f"unexpected GGUF tensor {gguf_name!r}")


def unpermute_qk(weight: np.ndarray, num_heads: int) -> np.ndarray:
    """Undo llama.cpp's interleaving of each head's rotary halves in attn_q / attn_k rows."""
    rows, cols = weight.shape
    return (weight.reshape(num_heads, rows // num_heads // 2, 2, cols)
            .swapaxes(1, 2).reshape(rows, cols))


def _hf_tensors(reader: GGUFReader, config: dict, progress: bool) -> dict[str, torch.Tensor]:
    tensors = {}
    for tensor in tqdm(reader.tensors, desc="Converting GGUF tensors", unit="tensor",
                       disable=not progress):
        shape = [int(n) for n in reversed(tensor.shape)]  # GGUF lists dims innermost first
        weight = np.asarray(dequantize(tensor.data, tensor.tensor_type), dtype=np.float32)
        weight = weight.reshape(shape)
        if tensor.name.endswith("attn_q.weight"):
            weight = unpermute_qk(weight, config["num_attention_heads"])
        elif tensor.name.endswith("attn_k.weight"):
            weight = unpermute_qk(weight, config["num_key_value_heads"])
        # NOTE: F32 tensors are read-only views of the memory-mapped file: copy those.
        weight = np.require(weight, dtype=np.float32, requirements=["C", "W"])
        tensors[hf_tensor_name(tensor.name)] = torch.from_numpy(weight)
    return tensors


def source_fingerprint(gguf_path: Path) -> dict:
    """What CONVERSION_MARKER stores to tell whether a cached folder is still current."""
    stat = gguf_path.stat()
    return {"source": str(gguf_path.resolve()), "source_size": stat.st_size,
            "source_mtime_ns": stat.st_mtime_ns, "format_version": FORMAT_VERSION}


def convert_gguf_to_hf(gguf_path: str | Path, out_dir: str | Path, progress: bool = True) -> Path:
    """Write the HF folder for `gguf_path` at `out_dir` (replacing it) and return out_dir."""
    gguf_path, out_dir = Path(gguf_path), Path(out_dir)
    if not gguf_path.is_file():
        raise FileNotFoundError(f"GGUF file not found: {gguf_path}")
    reader = GGUFReader(gguf_path)
    meta = gguf_metadata(reader)
    config = hf_config_from_gguf(meta, {t.name for t in reader.tensors})
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.parent / f".{out_dir.name}.partial-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        save_file(_hf_tensors(reader, config, progress), str(tmp / "model.safetensors"),
                  metadata={"format": "pt"})
        write_tokenizer(gguf_path, tmp, meta)
        (tmp / CONVERSION_MARKER).write_text(json.dumps(source_fingerprint(gguf_path)))
        shutil.rmtree(out_dir, ignore_errors=True)  # a stale or partial earlier folder
        os.rename(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir
