"""Errors the engine raises to its callers (the server maps them to HTTP statuses). No torch."""


class EngineError(RuntimeError):
    """Base class of engine failures."""


class QueueFullError(EngineError):
    """The waiting queue is at `max_waiting_requests`; the server answers 503."""


class EngineDeadError(EngineError):
    """The engine loop or a worker failed; no further requests can be served."""


class RequestError(EngineError):
    """One request failed inside the engine (its output carries the message)."""


class WorkerError(EngineDeadError):
    """A worker process raised, died or did not answer; the executor has stopped every worker.

    `rank` is the worker that failed first (None when unknown); `remote_traceback` is its
    traceback text when it raised (None when it died).
    """

    def __init__(self, message: str, rank: int | None = None,
                 remote_traceback: str | None = None) -> None:
        super().__init__(message)
        self.rank = rank
        self.remote_traceback = remote_traceback
