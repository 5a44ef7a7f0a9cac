"""KV cache: block bookkeeping (pure Python) and the worker-side paged tensors."""
