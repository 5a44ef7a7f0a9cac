"""How many KV blocks a memory budget buys, and the start-up check that max_model_len fits.
No torch: plain arithmetic on the model's shape."""

from __future__ import annotations

DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


def kv_bytes_per_token(num_layers: int, num_kv_heads: int, head_dim: int, dtype: str) -> int:
    """K and V of one token across all layers."""
    return 2 * num_layers * num_kv_heads * head_dim * DTYPE_BYTES[dtype]


def plan_num_blocks(budget_bytes: int, block_size: int, bytes_per_token: int,
                    max_model_len: int, num_ranks: int = 1) -> int:
    """Blocks per worker that fit in `budget_bytes`; ValueError, saying what would fit, if a
    single request of `max_model_len` tokens could not be held by `num_ranks` SP ranks (its
    KV split in block-aligned chunks, one block of slack per rank beyond the first)."""
    block_bytes = block_size * bytes_per_token
    num_blocks = budget_bytes // block_bytes
    slack = 1 if num_ranks > 1 else 0
    request_blocks = -(-max_model_len // block_size)
    needed_blocks = -(-request_blocks // num_ranks) + slack
    if num_blocks < needed_blocks:
        capacity = max(0, num_blocks - slack) * num_ranks * block_size
        raise ValueError(
            f"max_model_len={max_model_len} does not fit in the KV cache: "
            f"{budget_bytes} bytes per worker hold {num_blocks} blocks of {block_size} tokens "
            f"({bytes_per_token} bytes/token) on each of {num_ranks} SP rank(s). Lower "
            f"--max-model-len to at most {capacity} or raise --kv-cache-memory-bytes to at "
            f"least {needed_blocks * block_bytes}.")
    return num_blocks
