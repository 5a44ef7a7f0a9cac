"""Errors the engine raises to its callers (the server maps them to HTTP statuses). No torch."""


class EngineError(RuntimeError):
    """Base class of engine failures."""


class QueueFullError(EngineError):
    """The waiting queue is at `max_waiting_requests`; the server answers 503."""


class EngineDeadError(EngineError):
    """The engine loop or a worker failed; no further requests can be served."""


class RequestError(EngineError):
    """One request failed inside the engine (its output carries the message)."""
