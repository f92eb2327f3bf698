"""Serving: continuous batching over the decoder (:mod:`.batcher`) and an OpenAI-compatible HTTP server with a
chat page (:mod:`.app`). ``python -m eagle_runtime serve --demo`` runs it on the embedded demo pair; FastAPI and
uvicorn come with the ``serve`` extra (``pip install -e ".[serve]"``)."""

from .batcher import QueueFull, Request, RowBatch, Scheduler

__all__ = ["QueueFull", "Request", "RowBatch", "Scheduler"]
