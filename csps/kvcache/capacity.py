"""How many KV blocks a memory budget buys, and the start-up check that max_model_len fits.
No torch: plain arithmetic on the model's shape."""

from __future__ import annotations

DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


def kv_bytes_per_token(num_layers: int, num_kv_heads: int, head_dim: int, dtype: str) -> int:
    """K and V of one token across all layers."""
    return 2 * num_layers * num_kv_heads * head_dim * DTYPE_BYTES[dtype]


def plan_num_blocks(budget_bytes: int, block_size: int, bytes_per_token: int,
                    max_model_len: int) -> int:
    """Blocks that fit in `budget_bytes`; ValueError, saying what would fit, if a single request
    of `max_model_len` tokens could not be held."""
    block_bytes = block_size * bytes_per_token
    num_blocks = budget_bytes // block_bytes
    capacity = num_blocks * block_size
    if capacity < max_model_len:
        needed = -(-max_model_len // block_size) * block_bytes
        raise ValueError(
            f"max_model_len={max_model_len} does not fit in the KV cache: "
            f"{budget_bytes} bytes hold {num_blocks} blocks of {block_size} tokens "
            f"({capacity} tokens at {bytes_per_token} bytes/token). Lower --max-model-len to "
            f"at most {capacity} or raise --kv-cache-memory-bytes to at least {needed}.")
    return num_blocks
