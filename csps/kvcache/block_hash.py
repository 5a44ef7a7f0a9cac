"""Block hashes: the identity of a full KV block for automatic prefix caching. No torch.

A block's hash covers its parent's hash (so the whole prefix from position 0), its token ids and
any extra keys that change its KV; two blocks with equal hashes hold equal KV. The KV of a
deployment depends on nothing else: the model, dtype and rotary positions are fixed, and the
position is the chain's length. (Lossy attention, CSA with sparsity, does change the KV of later
layers: the scheduler never caches what it computed.) Python's hash of an int tuple is
deterministic across processes; a 64-bit collision among N cached blocks has probability about
N^2 / 2^65 (1e-7 for 2M blocks), the same trade vLLM made with its default builtin hash.
"""

from __future__ import annotations

from typing import Protocol

ROOT_HASH = 0  # the parent of a sequence's first block


class TokenSource(Protocol):
    request_id: str

    @property
    def num_prompt_tokens(self) -> int: ...

    def token_ids_between(self, start: int, end: int) -> list[int]: ...


def hash_block(parent_hash: int, token_ids: tuple[int, ...], extra_keys: tuple = ()) -> int:
    return hash((parent_hash, token_ids, extra_keys))


def hash_blocks(token_ids: list[int], block_size: int, extra_keys: tuple = ()) -> list[int]:
    """The hash chain of every full block of `token_ids`."""
    hashes, parent = [], ROOT_HASH
    for start in range(0, len(token_ids) - block_size + 1, block_size):
        parent = hash_block(parent, tuple(token_ids[start:start + block_size]), extra_keys)
        hashes.append(parent)
    return hashes


class BlockHashBook:
    """Each live request's block hashes, extended as its known tokens fill blocks (hashed once;
    a request's tokens never change, they only grow)."""

    def __init__(self, block_size: int, extra_keys: tuple = ()) -> None:
        if block_size < 1:
            raise ValueError(f"block_size must be positive, got {block_size}")
        self.block_size = block_size
        self.extra_keys = extra_keys
        self._hashes: dict[str, list[int]] = {}

    def hashes(self, request: TokenSource, num_tokens: int) -> list[int]:
        """The hashes of the request's full blocks within its first num_tokens tokens."""
        hashes = self._hashes.setdefault(request.request_id, [])
        bs, want = self.block_size, num_tokens // self.block_size
        if len(hashes) < want:
            parent = hashes[-1] if hashes else ROOT_HASH
            ids = request.token_ids_between(len(hashes) * bs, want * bs)
            for start in range(0, len(ids), bs):
                parent = hash_block(parent, tuple(ids[start:start + bs]), self.extra_keys)
                hashes.append(parent)
        return hashes[:want]

    def hashes_so_far(self, request_id: str) -> list[int]:
        """The hashes computed for the request so far (none for an unknown one)."""
        return self._hashes.get(request_id, [])

    def forget(self, request_id: str) -> None:
        self._hashes.pop(request_id, None)
