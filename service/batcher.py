"""Dynamic batching: many concurrent single-image requests -> few batched model calls.

:class:`MicroBatcher` owns one worker task and one inference thread per runtime. Requests are
grouped by key ``(input_height, input_width, iterations)`` (a batch must share one input size and
one graph). The worker takes the key whose oldest request waited longest, waits until that request
is ``max_wait_s`` old or ``max_batch_size`` requests of that key are pending, drops requests that
were cancelled, timed out or whose client disconnected, and runs the rest as one call in its thread
(ONNX Runtime releases the GIL, so the event loop keeps serving). While a batch runs, new requests
pile up and form the next batch: under load batches grow without any extra waiting.

Two signs say more requests are about to arrive, and extend the wait beyond ``max_wait_s``:
requests of the batch's key announced with :meth:`MicroBatcher.expect` (body received, image still
being decoded: the wait extends up to ``10 * max_wait_s``), and fewer requests pending than the
previous batch of that key had (its clients are likely resubmitting: the wait extends up to 10 % of
that batch's inference time). Both limits count from the oldest request. Without this, N clients that all
resubmit when a batch of N finishes arrive spread over their turnaround, and the batches settle into
halves of N — which on a CPU costs more throughput than the bounded wait does.

Back-pressure: at most ``max_queue`` requests wait (not counting the batch being run); beyond that
:meth:`MicroBatcher.submit` raises :class:`QueueFullError` at once with a ``Retry-After`` estimate.
Each request has ``timeout_s`` from submission to result, else :class:`BatchTimeoutError`.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import math
import time
from collections import OrderedDict, deque
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from lift_serve.service.timing import record

logger = logging.getLogger("lift.batcher")


class QueueFullError(Exception):
    """The queue holds ``max_queue`` requests; :attr:`retry_after_s` estimates when there is room."""

    def __init__(self, depth: int, retry_after_s: int):
        super().__init__(f"{depth} requests are already waiting")
        self.depth = depth
        self.retry_after_s = retry_after_s


class BatchTimeoutError(Exception):
    """The request waited and ran longer than ``timeout_s``."""


class BatcherClosedError(Exception):
    """The batcher is shutting down."""


class ClientGoneError(Exception):
    """The request was dropped before inference because its client disconnected."""


@dataclasses.dataclass
class BatchHooks:
    """Callbacks for metrics; all optional. ``on_drop`` reasons: disconnected, cancelled."""

    on_batch: Callable[[int, float], None] = lambda size, seconds: None
    on_drop: Callable[[str], None] = lambda reason: None
    on_depth: Callable[[int], None] = lambda depth: None


Payload = np.ndarray | tuple[np.ndarray, ...]


def _stack(payloads: list[Payload]) -> Payload:
    """Rows -> one batch: an array per row, or a tuple of arrays per row (stacked part by part)."""
    if isinstance(payloads[0], tuple):
        return tuple(np.stack(parts) for parts in zip(*payloads, strict=True))
    return np.stack(payloads)


def _row(batch: Payload, index: int, own: bool) -> Payload:
    # A row of a batch is a view that keeps the whole batch alive; the feature cache holds results
    # for long and budgets them by their own size, so each gets its own copy (``own``).
    if isinstance(batch, tuple):
        return tuple(part[index].copy() if own else part[index] for part in batch)
    return batch[index].copy() if own else batch[index]


@dataclasses.dataclass
class _Item:
    image: Payload
    future: asyncio.Future
    enqueued: float
    is_gone: Callable[[], Awaitable[bool]] | None
    dropped: bool = False
    batch_started: float = 0.0  # when its batch started running in the inference thread (time.monotonic)
    batch_seconds: float = 0.0  # how long that batch ran


class MicroBatcher:
    """Groups single-image requests into batched calls of ``run_batch``.

    Args:
        run_batch: ``(batch, iterations) -> result``; called in the batcher's thread, one call at a
            time. A batch stacks the submitted payloads: arrays (``[B, ...]``), or tuples of arrays
            stacked part by part; the result is an array or a tuple of arrays with B rows, whose
            row i (part by part) answers request i.
        max_batch_size: largest B (1 = no batching).
        max_wait_s: longest time the oldest request waits for others before its batch runs.
        max_queue: most requests waiting at once.
        timeout_s: per-request limit from :meth:`submit` to result.
        hooks: metric callbacks.
        executor: a single-thread executor to run batches in, shared with other batchers so that
            inference calls never overlap (None: the batcher makes and owns one).
    """

    def __init__(self, run_batch: Callable[[Payload, int], Payload], max_batch_size: int = 8,
                 max_wait_s: float = 0.005, max_queue: int = 64, timeout_s: float = 30.0,
                 hooks: BatchHooks | None = None, executor: ThreadPoolExecutor | None = None):
        if max_batch_size < 1 or max_queue < 1:
            raise ValueError("max_batch_size and max_queue must be >= 1")
        self.run_batch = run_batch
        self.max_batch_size = max_batch_size
        self.max_wait_s = max_wait_s
        self.max_queue = max_queue
        self.timeout_s = timeout_s
        self.hooks = hooks or BatchHooks()
        self.batches_run = 0
        self.images_run = 0
        self.max_fill_s = 10 * max_wait_s
        self._pending: OrderedDict[tuple, deque[_Item]] = OrderedDict()
        self._expected: dict[tuple, int] = {}
        self._depth = 0
        self._wakeup: asyncio.Event | None = None
        self._worker: asyncio.Task | None = None
        self._executor: ThreadPoolExecutor | None = executor
        self._owns_executor = executor is None
        self._last_batch_s = 0.05
        self._last_size: dict[tuple, tuple[int, float]] = {}  # key -> (size, seconds) of its last batch

    # -- lifecycle -------------------------------------------------------------------------------
    def start(self) -> None:
        """Start the worker on the running event loop."""
        self._wakeup = asyncio.Event()
        if self._owns_executor:
            self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="lift-inference")
        self._worker = asyncio.get_running_loop().create_task(self._loop(), name="lift-batcher")

    async def stop(self) -> None:
        """Stop the worker; waiting requests fail with :class:`BatcherClosedError`."""
        if self._worker is not None:
            self._worker.cancel()
            try:
                await self._worker
            except asyncio.CancelledError:
                pass
            self._worker = None
        for queue in self._pending.values():
            for item in queue:
                if not item.future.done():
                    item.future.set_exception(BatcherClosedError("the server is shutting down"))
        self._pending.clear()
        self._set_depth(0)
        if self._executor is not None and self._owns_executor:
            self._executor.shutdown(wait=True)
            self._executor = None

    @property
    def depth(self) -> int:
        """Requests waiting (not counting the batch being run)."""
        return self._depth

    # -- requests --------------------------------------------------------------------------------
    @staticmethod
    def key(image_shape: tuple[int, ...], iterations: int) -> tuple[int, int, int]:
        """The grouping key of an ``[H, W, 3]`` image (a payload's first part) run with ``iterations``."""
        return int(image_shape[0]), int(image_shape[1]), int(iterations)

    def expect(self, key: tuple) -> None:
        """Announce a request of ``key`` that will be submitted soon (pair with :meth:`unexpect`)."""
        self._expected[key] = self._expected.get(key, 0) + 1

    def unexpect(self, key: tuple) -> None:
        """The announced request was submitted or gave up; call right before :meth:`submit`."""
        left = self._expected.get(key, 0) - 1
        if left > 0:
            self._expected[key] = left
        else:
            self._expected.pop(key, None)
        if self._wakeup is not None:
            self._wakeup.set()

    async def submit(self, image: Payload, iterations: int,
                     is_gone: Callable[[], Awaitable[bool]] | None = None) -> Payload:
        """The result row of one request.

        Args:
            image: uint8 ``[H, W, 3]`` model input, or a tuple whose first part it is.
            iterations: density to compute.
            is_gone: async predicate checked just before inference (e.g. ``request.is_disconnected``);
                True drops the request without running it.

        Returns:
            this request's row of ``run_batch``'s result (e.g. float32 ``[C, h, w]``).

        Raises:
            QueueFullError, BatchTimeoutError, BatcherClosedError, ClientGoneError, or what
            ``run_batch`` raised.
        """
        if self._worker is None:
            raise BatcherClosedError("the batcher is not running")
        if self._depth >= self.max_queue:
            batches_ahead = math.ceil(self._depth / self.max_batch_size) + 1
            raise QueueFullError(self._depth, max(1, math.ceil(batches_ahead * self._last_batch_s)))
        loop = asyncio.get_running_loop()
        key = self.key((image[0] if isinstance(image, tuple) else image).shape, iterations)
        item = _Item(image, loop.create_future(), loop.time(), is_gone)
        self._pending.setdefault(key, deque()).append(item)
        self._set_depth(self._depth + 1)
        self._wakeup.set()
        try:
            result = await asyncio.wait_for(item.future, self.timeout_s)
        except asyncio.TimeoutError:
            raise BatchTimeoutError(f"no result within {self.timeout_s:g} s") from None
        except asyncio.CancelledError:
            if item.dropped:  # the worker dropped it (client gone); this task itself was not cancelled
                raise ClientGoneError("the client disconnected before inference") from None
            raise
        # loop.time() is CLOCK_MONOTONIC too (uvloop's to the millisecond): never below zero
        record("queue", max(0.0, item.batch_started - item.enqueued))
        record("inference", item.batch_seconds)
        return result

    # -- worker ----------------------------------------------------------------------------------
    def _set_depth(self, depth: int) -> None:
        self._depth = depth
        self.hooks.on_depth(depth)

    def _oldest_key(self) -> tuple | None:
        best, best_time = None, math.inf
        for key, queue in self._pending.items():
            if queue and queue[0].enqueued < best_time:
                best, best_time = key, queue[0].enqueued
        return best

    async def _wait_for_news(self, timeout: float | None) -> None:
        self._wakeup.clear()
        try:
            await asyncio.wait_for(self._wakeup.wait(), timeout)
        except asyncio.TimeoutError:
            pass

    async def _take_batch(self) -> tuple[tuple, list[_Item]]:
        loop = asyncio.get_running_loop()
        while (key := self._oldest_key()) is None:
            await self._wait_for_news(None)
        oldest = self._pending[key][0].enqueued
        last_size, last_seconds = self._last_size.get(key, (1, 0.0))
        refill = max(self.max_wait_s, 0.1 * last_seconds)
        while len(self._pending[key]) < self.max_batch_size:
            if self._expected.get(key):  # ends by itself: decoding takes milliseconds
                wait = max(self.max_fill_s, refill)
            elif len(self._pending[key]) < last_size:
                wait = refill
            else:
                wait = self.max_wait_s
            remaining = oldest + wait - loop.time()
            if remaining <= 0:
                break
            await self._wait_for_news(remaining)
        queue = self._pending[key]
        batch = [queue.popleft() for _ in range(min(len(queue), self.max_batch_size))]
        if not queue:
            del self._pending[key]
        self._set_depth(self._depth - len(batch))
        return key, batch

    async def _live(self, batch: list[_Item]) -> list[_Item]:
        live = []
        for item in batch:
            if item.future.done():  # timed out or the handler was cancelled
                self.hooks.on_drop("cancelled")
                continue
            if item.is_gone is not None:
                try:
                    gone = await item.is_gone()
                except Exception:
                    gone = False
                if gone:
                    item.dropped = True
                    item.future.cancel()
                    self.hooks.on_drop("disconnected")
                    continue
            live.append(item)
        return live

    def _run_timed(self, images: Payload, iterations: int) -> tuple[Payload, float, float]:
        """``run_batch`` with when it started (the event loop's clock, ``time.monotonic``) and how long
        it ran, both taken in the inference thread: time spent waiting for that thread (another
        batcher's batch) is queueing, not inference."""
        started = time.monotonic()
        result = self.run_batch(images, iterations)
        return result, started, time.monotonic() - started

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            key, batch = await self._take_batch()
            live = await self._live(batch)
            if not live:
                continue
            images = _stack([item.image for item in live])
            try:
                features, batch_started, seconds = await loop.run_in_executor(
                    self._executor, self._run_timed, images, key[2])
            except Exception as exc:  # a failing batch fails its requests, never the worker
                logger.exception("inference failed for a batch of %d", len(live))
                for item in live:
                    if not item.future.done():
                        item.future.set_exception(exc)
                continue
            self._last_batch_s = seconds
            self._last_size[key] = (len(live), seconds)
            self.batches_run += 1
            self.images_run += len(live)
            self.hooks.on_batch(len(live), seconds)
            for index, item in enumerate(live):
                if not item.future.done():
                    item.batch_started, item.batch_seconds = batch_started, seconds
                    item.future.set_result(_row(features, index, own=len(live) > 1))
