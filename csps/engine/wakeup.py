"""Wakeup: lets the engine's loop, blocked on its workers' replies, also wake when a request
arrives or is aborted, so instances left idle by the steps in flight start new work at once
(as the simulator starts them). A one-way pipe: `set()` from any thread makes `waitable` ready
for `multiprocessing.connection.wait` until the loop calls `clear()`. No torch."""

from __future__ import annotations

import multiprocessing
import threading


class Wakeup:
    def __init__(self) -> None:
        self._reader, self._writer = multiprocessing.Pipe(duplex=False)
        self._lock = threading.Lock()
        self._is_set = False

    @property
    def waitable(self):
        """The end to wait on beside the workers' connections."""
        return self._reader

    def set(self) -> None:
        with self._lock:
            if not self._is_set and not self._writer.closed:
                self._writer.send_bytes(b"1")
                self._is_set = True

    def clear(self) -> None:
        """Called by the loop before it reads its commands: a set() after this wakes it again."""
        with self._lock:
            while self._reader.poll():
                self._reader.recv_bytes()
            self._is_set = False

    def close(self) -> None:
        with self._lock:
            self._writer.close()
            self._reader.close()
