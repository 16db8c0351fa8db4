"""`llmkit serve`: an OpenAI- and ollama-compatible HTTP server over a continuous-batching engine.

    engine.py   the scheduler: a pool of KV-cache rows, chunked prefill, per-row sampling (token ids only)
    api.py      the FastAPI app: OpenAI and ollama routes, streaming, errors, auth, limits, metrics
    metrics.py  Prometheus text counters / histograms
    web/        the chat page served at /
"""

from .engine import Engine, EngineClosed, Event, QueueFull, Request
from .metrics import Metrics

__all__ = ["Engine", "EngineClosed", "Event", "QueueFull", "Request", "Metrics"]
