"""Where a request's time goes: per-stage seconds, answered as a ``Server-Timing`` header and
observed in the ``lift_stage_seconds{stage}`` histogram.

Stages (summed over a request's images; a stage a request did not go through is left out):

* ``read``: hashing the upload and reading its header (the cache lookup's key and the plan);
* ``decode``: decoding and resizing it to the model input (Pillow, a thread);
* ``queue``: waiting in the batcher for a batch to form and for the inference thread;
* ``inference``: the model call of the request's batch (shared by every request in it);
* ``encode``: writing the answer (``.npy``, JSON, PNG);
* ``total``: the whole request, as the server saw it.

Why a header: a client, a load generator (``lift bench serve``) or a browser's network panel sees
the breakdown of each request without a profiler or access to the server's metrics; the W3C
``Server-Timing`` format is what browsers' developer tools display. The recorder is a context
variable set per request by :class:`ServerTimingMiddleware`: route code, the feature pipeline and
the threads they start (``asyncio.to_thread`` copies the context) add to the same dict.
"""

from __future__ import annotations

import contextlib
import contextvars
import time

STAGES = ("read", "decode", "queue", "inference", "encode")
_stages: contextvars.ContextVar[dict[str, float] | None] = contextvars.ContextVar("lift_stages", default=None)


def record(stage: str, seconds: float) -> None:
    """Add ``seconds`` to ``stage`` of the current request (no-op outside a request)."""
    stages = _stages.get()
    if stages is not None:
        stages[stage] = stages.get(stage, 0.0) + seconds


@contextlib.contextmanager
def timed(stage: str):
    """Time the block as ``stage`` of the current request."""
    started = time.perf_counter()
    try:
        yield
    finally:
        record(stage, time.perf_counter() - started)


def header_value(stages: dict[str, float]) -> str:
    """``read;dur=0.41, decode;dur=3.2, ...`` in milliseconds, stages in :data:`STAGES` order."""
    order = [s for s in (*STAGES, "total") if s in stages]
    return ", ".join(f"{s};dur={1000 * stages[s]:.2f}" for s in order)


def parse_header(value: str) -> dict[str, float]:
    """``{stage: milliseconds}`` of a ``Server-Timing`` header (the client side of :func:`header_value`)."""
    out = {}
    for part in value.split(","):
        name, _, rest = part.strip().partition(";")
        if rest.startswith("dur="):
            try:
                out[name] = float(rest[4:])
            except ValueError:
                continue
    return out


class ServerTimingMiddleware:
    """Pure ASGI middleware: a fresh stage recorder per HTTP request, its sums added to the answer's
    head as ``Server-Timing`` and to ``observe(stage, seconds)`` (a metrics callback) at the end."""

    def __init__(self, app, observe=None):
        self.app = app
        self.observe = observe

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        stages: dict[str, float] = {}
        token = _stages.set(stages)
        started = time.perf_counter()

        async def send_with_timing(message):
            if message["type"] == "http.response.start" and stages:
                stages["total"] = time.perf_counter() - started
                headers = list(message.get("headers", []))
                headers.append((b"server-timing", header_value(stages).encode("latin-1")))
                message = {**message, "headers": headers}
            await send(message)

        try:
            await self.app(scope, receive, send_with_timing)
        finally:
            _stages.reset(token)
            if self.observe is not None:
                for stage in STAGES:
                    if stage in stages:
                        self.observe(stage, stages[stage])
