"""OpenAI-compatible HTTP server for csps: `create_app(engine)` and the Prometheus stat logger.
Start it with `csps serve MODEL` or `python -m csps.server MODEL`."""

from csps.server.api import create_app
from csps.server.metrics import PrometheusStatLogger

__all__ = ["PrometheusStatLogger", "create_app"]
