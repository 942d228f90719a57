"""From uploaded bytes (or a feature id) to cached dense features: the service's one pipeline.

``upload bytes -> (thread) hash + header -> geometry plan -> cache lookup -> (thread) decode + resize
-> MicroBatcher (backbone + upsampler) -> Embedding and FeatureEntry in the cache``. A density not
yet computed for a cached image skips the backbone: its embedding (backbone features and the
model-input pixels) goes through a second batcher that runs only the upsampler's steps. Both
batchers share one inference thread, so engine calls never overlap. Every route goes through
:class:`FeatureService`, so all of them share the cache, the batchers and the geometry per image.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from lift_serve.service.batcher import (
    BatcherClosedError,
    BatchHooks,
    BatchTimeoutError,
    ClientGoneError,
    MicroBatcher,
    QueueFullError,
)
from lift_serve.service.cache import (
    Embedding,
    FeatureCache,
    FeatureEntry,
    content_hash,
    embedding_key,
    parse_feature_id,
    with_iterations,
)
from lift_serve.service.codec import decode_image, read_header
from lift_serve.service.decode_gate import DecodeGate
from lift_serve.service.errors import ServiceError
from lift_serve.service.geometry import ImageGeometry
from lift_serve.service.metrics import ServiceMetrics
from lift_serve.service.settings import Settings

logger = logging.getLogger("lift.service")


class FeatureService:
    """Features for uploads and feature ids, through the cache and the batcher.

    Args:
        runtime: a loaded :class:`~lift_serve.service.runtime.Runtime` (or anything with its ``sizes``,
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
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="lift-inference")
        options = dict(max_batch_size=settings.effective_batch_size, max_wait_s=settings.max_wait_ms / 1000.0,
                       max_queue=settings.max_queue, timeout_s=settings.request_timeout_s,
                       hooks=BatchHooks(on_batch=metrics.observe_batch,
                                        on_drop=lambda reason: metrics.dropped.labels(reason).inc(),
                                        on_depth=metrics.queue_depth.set),
                       executor=self._executor)
        self.batcher = MicroBatcher(self._embed_and_upsample, **options)
        self.decodes = DecodeGate(settings.decode_concurrency, settings.decode_pixel_budget,
                                  settings.request_timeout_s)
        self.upsampler = MicroBatcher(self._upsample, **options)

    def start(self) -> None:
        self.batcher.start()
        self.upsampler.start()

    async def stop(self) -> None:
        await self.batcher.stop()
        await self.upsampler.stop()
        self._executor.shutdown(wait=True)

    # -- what the batchers run (inference thread) ----------------------------------------------------
    def _embed_and_upsample(self, images: np.ndarray, iterations: int) -> tuple[np.ndarray, ...]:
        """(backbone features, features at ``iterations``); just the first at density 0, so that a
        batch's rows are not copied twice."""
        coarse = self.runtime.embed(images)
        return (coarse, self.runtime.upsample(images, coarse, iterations)) if iterations else (coarse,)

    def _upsample(self, batch: tuple[np.ndarray, np.ndarray], iterations: int) -> np.ndarray:
        pixels, coarse = batch
        return self.runtime.upsample(pixels, coarse, iterations)

    @staticmethod
    def _check_cache_budget(runtime, cache_bytes: int) -> None:
        """Refuse a cache budget that cannot hold one image (0 = caching off is allowed): its
        embedding and its features at the densest offered density, with their per-cell norms.

        Such a cache would hand out feature ids that are already evicted, so every re-click fails.
        """
        if cache_bytes <= 0:
            return
        largest = max(
            runtime.channels * ch * cw * 4 + height * width * 3  # embedding: coarse features + pixels
            + (runtime.channels + 1) * h * w * 4  # features at density k and their norms, float32
            for height, width in runtime.sizes
            for ch, cw in [runtime.feature_size(height, width, 0)]
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

    def _plan(self, data: bytes) -> tuple[str, ImageGeometry]:
        header = read_header(data, self.settings.max_pixels)
        geometry = ImageGeometry.plan(header.width, header.height, self.runtime.sizes, self.settings.resize_policy,
                                      self.runtime.stride(0))
        return embedding_key(content_hash(data), geometry), geometry

    def _model_input(self, data: bytes, geometry: ImageGeometry):
        return geometry.prepare(decode_image(data, self.settings.max_pixels))

    def _entry(self, embedding: Embedding, iterations: int, features: np.ndarray) -> FeatureEntry:
        geometry = dataclasses.replace(embedding.geometry, stride=float(self.runtime.stride(iterations)))
        entry = FeatureEntry(with_iterations(embedding.id, iterations), features, geometry, iterations,
                             embedding.image_bytes)
        self.cache.put(entry)
        self.metrics.cache_bytes.set(self.cache.bytes_used)
        return entry

    async def _submit(self, batcher: MicroBatcher, payload, iterations: int,
                      is_gone: Callable[[], Awaitable[bool]] | None):
        try:
            return await batcher.submit(payload, iterations, is_gone)
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

    async def _densify(self, embedding: Embedding, iterations: int,
                       is_gone: Callable[[], Awaitable[bool]] | None) -> FeatureEntry:
        """Features at ``iterations`` of a cached embedding: upsampler steps only, no backbone."""
        if iterations == 0:
            return self._entry(embedding, 0, embedding.coarse)
        features = await self._submit(self.upsampler, (embedding.pixels, embedding.coarse), iterations, is_gone)
        return self._entry(embedding, iterations, features)

    async def from_upload(self, data: bytes, iterations: int,
                          is_gone: Callable[[], Awaitable[bool]] | None = None) -> FeatureEntry:
        """Features of an uploaded image file: cached features, else the cached embedding plus
        upsampler steps, else decode, batch, run backbone and upsampler, and cache both."""
        key, geometry = await asyncio.to_thread(self._plan, data)
        entry = await self._from_cache(key, iterations, is_gone)
        if entry is not None:
            return entry
        batch_key = self.batcher.key((geometry.input_height, geometry.input_width), iterations)
        self.batcher.expect(batch_key)  # so that a batch about to close waits for this image's decode
        try:
            async with self.decodes.admit(geometry.width * geometry.height):
                model_input = await asyncio.to_thread(self._model_input, data, geometry)
        finally:
            self.batcher.unexpect(batch_key)
        # No await between unexpect and the enqueue inside submit: the worker never sees a gap.
        result = await self._submit(self.batcher, model_input, iterations, is_gone)
        embedding = Embedding(key, result[0], model_input, geometry, data)
        self.cache.put(embedding)
        return self._entry(embedding, iterations, result[-1])

    def id_iterations(self, fid: str) -> int | None:
        """The density a feature id was issued for (None if it is not a feature id)."""
        parsed = parse_feature_id(fid)
        return parsed[1] if parsed else None

    async def _from_cache(self, key: str, iterations: int,
                          is_gone: Callable[[], Awaitable[bool]] | None) -> FeatureEntry | None:
        """Cached features of embedding ``key`` at ``iterations``, else computed from the cached
        embedding (upsampler steps only), else None."""
        entry = self.cache.get(with_iterations(key, iterations))
        if entry is not None:
            return entry
        embedding = self.cache.get(key, count=False)
        return None if embedding is None else await self._densify(embedding, iterations, is_gone)

    async def from_id(self, fid: str, iterations: int | None = None,
                      is_gone: Callable[[], Awaitable[bool]] | None = None) -> FeatureEntry:
        """Features by id: at the id's own density unless ``iterations`` asks for another, which is
        computed from the cached embedding (upsampler steps only). 404 ``unknown_feature_id`` when
        neither the features nor the image's embedding is cached."""
        parsed = parse_feature_id(fid)
        entry = None
        if parsed is not None:
            key, issued = parsed
            entry = await self._from_cache(key, issued if iterations is None else self.iterations(iterations), is_gone)
        if entry is None:
            raise ServiceError(404, "unknown_feature_id",
                               f"feature id {fid[:100]!r} is unknown or was evicted from the cache; "
                               "send the image again (the response carries a fresh id)")
        return entry
