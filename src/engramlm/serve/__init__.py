"""Serving: an OpenAI-compatible HTTP server over a continuous-batching scheduler.

Layer: above ``infer`` (it drives :class:`~engramlm.infer.Engine`), below ``cli``. FastAPI, uvicorn and
prometheus_client (the ``serve`` extra) are imported by :mod:`engramlm.serve.app` only, so the scheduler
works without them.
"""

from engramlm.serve.scheduler import Event, QueueFull, Request, Scheduler, ShuttingDown

__all__ = ["Event", "QueueFull", "Request", "Scheduler", "ShuttingDown"]
