"""From uploaded bytes (or a feature id) to cached dense features: the service's one pipeline.

``upload bytes -> (thread) hash + header -> geometry plan -> cache lookup -> (thread) decode + resize
-> MicroBatcher -> FeatureEntry in the cache``. Every route goes through :class:`FeatureService`, so
all of them share the cache, the batcher and the one geometry object per image.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

from lift_serve.service.batcher import (
    BatcherClosedError,
    BatchHooks,
    BatchTimeoutError,
    ClientGoneError,
    MicroBatcher,
    QueueFullError,
)
from lift_serve.service.cache import FeatureCache, FeatureEntry, content_hash, feature_id
from lift_serve.service.codec import decode_image, read_header
from lift_serve.service.errors import ServiceError
from lift_serve.service.geometry import ImageGeometry
from lift_serve.service.metrics import ServiceMetrics
from lift_serve.service.settings import Settings

logger = logging.getLogger("lift.service")


class FeatureService:
    """Features for uploads and feature ids, through the cache and the batcher.

    Args:
        runtime: a loaded ``service.runtime.BundleRuntime`` (or anything with its ``sizes``,
            ``iterations``, ``default_iterations``, ``stride(k)`` and ``run(images, k)``).
        settings: limits, resize policy, batching knobs.
        metrics: where cache and batch metrics go.
    """

    def __init__(self, runtime, settings: Settings, metrics: ServiceMetrics):
        self.runtime = runtime
        self.settings = settings
        self.metrics = metrics
        self._check_cache_budget(runtime, settings.cache_bytes)
        self.cache = FeatureCache(settings.cache_bytes, on_hit=metrics.cache_hits.inc, on_miss=metrics.cache_misses.inc)
        self.batcher = MicroBatcher(
            runtime.run,
            max_batch_size=settings.effective_batch_size,
            max_wait_s=settings.max_wait_ms / 1000.0,
            max_queue=settings.max_queue,
            timeout_s=settings.request_timeout_s,
            hooks=BatchHooks(on_batch=metrics.observe_batch,
                             on_drop=lambda reason: metrics.dropped.labels(reason).inc(),
                             on_depth=metrics.queue_depth.set),
        )

    @staticmethod
    def _check_cache_budget(runtime, cache_bytes: int) -> None:
        """Refuse a cache budget that cannot hold one image's features (0 = caching off is allowed).

        Such a cache would hand out feature ids that are already evicted, so every re-click fails.
        """
        if cache_bytes <= 0:
            return
        largest = max(
            (runtime.channels + 1) * h * w * 4  # features and their per-cell norms, float32
            for height, width in runtime.sizes
            for k in runtime.iterations
            for h, w in [runtime.feature_size(height, width, k)]
        )
        if cache_bytes < largest:
            raise ValueError(
                f"LIFT_CACHE_BYTES={cache_bytes} cannot hold the features of one image (up to {largest} bytes "
                f"for this bundle); set it to at least {largest * 4} to keep a few images, or 0 to turn caching off"
            )

    def iterations(self, requested: int | None) -> int:
        """The LiFT iteration count to use (422 if the bundle has no graph for it)."""
        if requested is None:
            return self.runtime.default_iterations
        if requested not in self.runtime.iterations:
            raise ServiceError(422, "invalid_parameter",
                               f"iterations={requested} is not offered by this bundle; choose one of "
                               f"{self.runtime.iterations} (see GET /v1/models)")
        return requested

    def _plan(self, data: bytes, iterations: int) -> tuple[str, ImageGeometry]:
        header = read_header(data, self.settings.max_pixels)
        geometry = ImageGeometry.plan(header.width, header.height, self.runtime.sizes, self.settings.resize_policy,
                                      self.runtime.stride(iterations))
        return feature_id(content_hash(data), iterations, geometry), geometry

    def _model_input(self, data: bytes, geometry: ImageGeometry):
        return geometry.prepare(decode_image(data, self.settings.max_pixels))

    async def from_upload(self, data: bytes, iterations: int,
                          is_gone: Callable[[], Awaitable[bool]] | None = None) -> FeatureEntry:
        """Features of an uploaded image file (cache first; otherwise decode, batch, run, cache)."""
        fid, geometry = await asyncio.to_thread(self._plan, data, iterations)
        entry = self.cache.get(fid)
        if entry is not None:
            return entry
        key = self.batcher.key((geometry.input_height, geometry.input_width), iterations)
        self.batcher.expect(key)  # so that a batch about to close waits for this image's decode
        try:
            model_input = await asyncio.to_thread(self._model_input, data, geometry)
        finally:
            self.batcher.unexpect(key)
        try:
            # No await between unexpect and the enqueue inside submit: the worker never sees a gap.
            features = await self.batcher.submit(model_input, iterations, is_gone)
        except QueueFullError as exc:
            self.metrics.rejected.labels("queue_full").inc()
            raise ServiceError(
                429, "queue_full",
                f"the server is busy ({exc.depth} images waiting, LIFT_MAX_QUEUE={self.settings.max_queue}); "
                f"retry after {exc.retry_after_s} s",
                headers={"Retry-After": str(exc.retry_after_s)}) from None
        except BatchTimeoutError:
            self.metrics.rejected.labels("timeout").inc()
            raise ServiceError(504, "timeout",
                               f"no result within {self.settings.request_timeout_s:g} s (LIFT_REQUEST_TIMEOUT_S); "
                               "the server is overloaded, retry later") from None
        except BatcherClosedError as exc:
            raise ServiceError(503, "unavailable", str(exc), headers={"Retry-After": "5"}) from None
        except ClientGoneError:
            raise ServiceError(499, "client_closed_request", "the client disconnected before inference") from None
        entry = FeatureEntry(fid, features, geometry, iterations, data)
        self.cache.put(entry)
        self.metrics.cache_bytes.set(self.cache.bytes_used)
        return entry

    def from_id(self, fid: str) -> FeatureEntry:
        """Cached features by id (404 ``unknown_feature_id`` when unknown or evicted)."""
        entry = self.cache.get(fid)
        if entry is None:
            raise ServiceError(404, "unknown_feature_id",
                               f"feature id {fid[:100]!r} is unknown or was evicted from the cache; "
                               "send the image again (the response carries a fresh id)")
        return entry
