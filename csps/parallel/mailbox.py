"""Point-to-point control messages under torchrun, for steps on part of the world.

Broadcasts (control.py) reach every rank, so they serialize the world: one call at a time. A
step runs only on its instances' ranks, and steps on disjoint ranks run at once, so rank 0 (the
engine) posts each rank its own calls and reads each rank's replies as they come. Messages go
through the rendezvous store (the torchrun TCPStore every rank already holds): a call is the
pickle under a key numbered per rank and direction, so nothing is overwritten and every
message is read once and deleted. Rank 0 polls for replies (store.check) without blocking, so
several steps can be in flight; a rank waits for its next call with the store's timeout.
Bytes are counted in the "control" phase of a CommStats, like the broadcasts. A rank killed
outright posts no error and breaks no connection rank 0 waits on, so every rank also beats: a
thread advances a counter in the store, and rank 0 treats a rank whose counter stops as dead.
"""

from __future__ import annotations

import pickle
import threading
import time
from datetime import timedelta
from typing import Any

import torch.distributed as dist

from csps.parallel.comm import CommStats

CALL_KEY = "csps/mail/call/{rank}/{seq}"  # rank 0 -> rank
REPLY_KEY = "csps/mail/reply/{rank}/{seq}"  # rank -> rank 0
BEAT_KEY = "csps/mail/beat/{rank}"  # a counter each rank's heartbeat thread advances


class Mailbox:
    """One rank's view of the store's mail. Sequence numbers advance in lock-step on both
    ends: the n-th call to a rank and its n-th reply share number n."""

    def __init__(self, stats: CommStats | None = None) -> None:
        self.store = dist.distributed_c10d._get_default_store()
        self.stats = stats
        self._sent: dict[int, int] = {}  # rank -> calls posted (rank 0) / replies (others)
        self._read: dict[int, int] = {}  # rank -> replies read (rank 0) / calls (others)

    # ---- rank 0 ---------------------------------------------------------------------------
    def post_call(self, rank: int, obj: Any) -> None:
        seq = self._sent.get(rank, 0)
        self._put(CALL_KEY.format(rank=rank, seq=seq), obj)
        self._sent[rank] = seq + 1

    def poll_reply(self, rank: int) -> tuple[bool, Any]:
        """(True, reply) if rank's next reply is in, else (False, None); never blocks."""
        key = REPLY_KEY.format(rank=rank, seq=self._read.get(rank, 0))
        if not self.store.check([key]):
            return False, None
        self._read[rank] = self._read.get(rank, 0) + 1
        return True, self._take(key)

    # ---- the other ranks ---------------------------------------------------------------------
    def next_call(self, rank: int, timeout_s: float) -> Any:
        """Block until rank 0's next call to `rank` (RuntimeError after timeout_s)."""
        key = CALL_KEY.format(rank=rank, seq=self._read.get(rank, 0))
        self.store.wait([key], timedelta(seconds=timeout_s))
        self._read[rank] = self._read.get(rank, 0) + 1
        return self._take(key)

    def reply(self, rank: int, obj: Any) -> None:
        seq = self._sent.get(rank, 0)
        self._put(REPLY_KEY.format(rank=rank, seq=seq), obj)
        self._sent[rank] = seq + 1

    def start_heartbeat(self, rank: int, period_s: float) -> threading.Thread:
        """Advance this rank's beat counter every period_s, in a daemon thread, for life."""
        def beat() -> None:
            while True:
                try:
                    self.store.add(BEAT_KEY.format(rank=rank), 1)
                except Exception:  # noqa: BLE001 - the store's host is gone: so are we
                    return
                time.sleep(period_s)
        thread = threading.Thread(target=beat, name=f"csps-heartbeat-{rank}", daemon=True)
        thread.start()
        return thread

    def beats(self, rank: int) -> int:
        """rank's beat count so far (0 before its first beat)."""
        return self.store.add(BEAT_KEY.format(rank=rank), 0)

    # ---- both ------------------------------------------------------------------------------
    def _put(self, key: str, obj: Any) -> None:
        start = time.perf_counter()
        data = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
        self.store.set(key, data)
        if self.stats is not None:
            self.stats.record("control", len(data), time.perf_counter() - start)

    def _take(self, key: str) -> Any:
        start = time.perf_counter()
        data = self.store.get(key)
        self.store.delete_key(key)
        if self.stats is not None:
            self.stats.record("control", len(data), time.perf_counter() - start)
        return pickle.loads(data)
