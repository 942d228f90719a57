"""Admission for image decoding, so that decodes cannot starve the server: at most
``concurrency`` decodes run at once (the others wait, within the request's deadline), and the
decoded pixels of all decodes running or waiting stay within ``pixel_budget``; an upload that would
exceed it is answered 503 with ``Retry-After`` at once instead of queueing memory.

The cost of one decode is bounded before it starts by the codec (``LIFT_MAX_PIXELS`` from the
header, and JPEGs with more scans than ``codec.MAX_JPEG_SCANS`` refused unread), which is what makes
a bounded number of them a bounded amount of work.
"""

from __future__ import annotations

import asyncio
import contextlib

from lift_serve.service.errors import ServiceError


class DecodeGate:
    def __init__(self, concurrency: int, pixel_budget: int, wait_s: float):
        self._slots = asyncio.Semaphore(concurrency)
        self.pixel_budget = pixel_budget
        self.wait_s = wait_s
        self.pixels_in_flight = 0

    @contextlib.asynccontextmanager
    async def admit(self, pixels: int):
        if self.pixels_in_flight + pixels > self.pixel_budget:
            raise ServiceError(503, "decode_busy",
                               f"the server is decoding {self.pixels_in_flight} pixels of other uploads "
                               f"(LIFT_DECODE_PIXEL_BUDGET={self.pixel_budget}); retry shortly",
                               {"Retry-After": "1"})
        self.pixels_in_flight += pixels
        try:
            try:
                await asyncio.wait_for(self._slots.acquire(), self.wait_s)
            except asyncio.TimeoutError:
                raise ServiceError(503, "decode_busy", f"no decode slot within {self.wait_s:g} s "
                                   "(LIFT_DECODE_CONCURRENCY); retry shortly", {"Retry-After": "1"}) from None
            try:
                yield
            finally:
                self._slots.release()
        finally:
            self.pixels_in_flight -= pixels
