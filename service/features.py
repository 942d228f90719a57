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
    Density,
    Embedding,
    FeatureCache,
    FeatureEntry,
    content_hash,
    embedding_key,
    key_input_size,
    parse_feature_id,
    with_density,
)
from lift_serve.service.codec import decode_image, read_header
from lift_serve.service.decode_gate import DecodeGate
from lift_serve.service.density import offered_iterations, resolve_density
from lift_serve.service.errors import ServiceError
from lift_serve.service.geometry import ImageGeometry
from lift_serve.service.metrics import ServiceMetrics
from lift_serve.service.resample import resample_features
from lift_serve.service.settings import MIB, Settings
from lift_serve.service.timing import timed

logger = logging.getLogger("lift.service")

# One upsampler call's output at most (bytes): a batch at a density whose rows are bigger
# runs a few rows at a time, so ONNX Runtime's intermediates (a few times the output) stay bounded
# by one image's, not the batch's. Pixel-dense 448 x 448 x 384 is 308 MB a row: one row a call.
UPSAMPLE_CHUNK_BYTES = 64 * MIB
# Defaults when LIFT_CACHE_BYTES / LIFT_MAX_RESPONSE_BYTES are unset: at least this, and at least
# what the bundle's densest density needs (two images in the cache, one image in an answer).
DEFAULT_BUDGET_BYTES = 256 * MIB


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
        largest = self._largest_image_bytes(runtime)
        self.largest_answer_bytes = largest.answer  # one image's float32 features at the densest density
        self.feature_dtype = feature_dtype(runtime)
        self.cache_bytes = self._cache_budget(settings.cache_bytes, largest)
        self.max_response_bytes = settings.max_response_bytes or max(DEFAULT_BUDGET_BYTES, largest.answer)
        self.cache = FeatureCache(self.cache_bytes, on_hit=metrics.cache_hits.inc, on_miss=metrics.cache_misses.inc)
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
        # A runtime that keeps the chain on its device (I/O binding on a GPU) says so with io_device;
        # otherwise embed and upsample are called apart (and wrappers of them stay in the path).
        chain = getattr(self.runtime, "embed_and_upsample", None)
        if (iterations and chain is not None and getattr(self.runtime, "io_device", None) is not None
                and len(images) <= self._rows_per_call(images, iterations)):
            return chain(images, iterations)  # one chain on the device: one copy out of each answer
        coarse = self.runtime.embed(images)
        return (coarse, self._upsample_rows(images, coarse, iterations)) if iterations else (coarse,)

    def _upsample(self, batch: tuple[np.ndarray, np.ndarray], iterations: int) -> np.ndarray:
        pixels, coarse = batch
        return self._upsample_rows(pixels, coarse, iterations)

    def _upsample_rows(self, images: np.ndarray, coarse: np.ndarray, iterations: int) -> np.ndarray:
        """The upsampler on a batch, a few rows a call when a row's output is large
        (:data:`UPSAMPLE_CHUNK_BYTES`); the rows land in one preallocated array."""
        h, w = self.runtime.feature_size(images.shape[1], images.shape[2], iterations)
        per_call = self._rows_per_call(images, iterations)
        if len(images) <= per_call:
            return self.runtime.upsample(images, coarse, iterations)
        out = np.empty((len(images), self.runtime.channels, h, w), self.feature_dtype)
        for start in range(0, len(images), per_call):
            stop = start + per_call
            out[start:stop] = self.runtime.upsample(images[start:stop], coarse[start:stop], iterations)
        return out

    def _rows_per_call(self, images: np.ndarray, iterations: int) -> int:
        h, w = self.runtime.feature_size(images.shape[1], images.shape[2], iterations)
        return max(1, UPSAMPLE_CHUNK_BYTES // (self.runtime.channels * h * w * self.feature_dtype.itemsize))

    # -- budgets -------------------------------------------------------------------------------------
    @dataclasses.dataclass(frozen=True)
    class _ImageBytes:
        cached: int  # one image in the cache: its embedding and features at the densest density
        answer: int  # one image's float32 features at the densest density

    @staticmethod
    def _largest_image_bytes(runtime) -> _ImageBytes:
        cached = answer = 0
        itemsize = feature_dtype(runtime).itemsize  # the cache holds the bundle's own precision
        for height, width in runtime.sizes:
            # The backbone's grid (patch size), whether or not the bundle offers density 0 itself.
            ch, cw = height // runtime.patch_size, width // runtime.patch_size
            embedding = runtime.channels * ch * cw * itemsize  # coarse features (the file is counted apart)
            for k in runtime.iterations:
                h, w = runtime.feature_size(height, width, k)
                # Features at density k and their float32 per-cell norms (an explicit stride's
                # resampled copy is never larger than the density it comes from).
                cached = max(cached, embedding + (runtime.channels * itemsize + 4) * h * w)
                answer = max(answer, runtime.channels * h * w * 4)
        return FeatureService._ImageBytes(cached, answer)

    @staticmethod
    def _cache_budget(configured: int | None, largest: _ImageBytes) -> int:
        """The cache budget: ``configured`` (0 = caching off), or when unset the larger of 256 MiB and
        two images at the densest density (a click's source and target).

        A budget that cannot hold one image is refused: such a cache would hand out feature ids
        that are already evicted, so every re-click would fail.
        """
        if configured is None:
            return max(DEFAULT_BUDGET_BYTES, 2 * largest.cached)
        if 0 < configured < largest.cached:
            raise ValueError(
                f"LIFT_CACHE_BYTES={configured} cannot hold the features of one image (up to {largest.cached} "
                f"bytes for this bundle); set it to at least {largest.cached * 4} to keep a few images, 0 to turn "
                "caching off, or leave it unset to size it from the bundle"
            )
        return configured

    # -- densities -----------------------------------------------------------------------------------
    def iterations(self, requested: int | None) -> int:
        """The upsampler step count to use (422 if the bundle has no graph for it)."""
        return offered_iterations(self.runtime, requested)

    def density(self, iterations: int | None, stride: float | None, input_size: tuple[int, int]) -> Density:
        """The density asked for by ``iterations`` or ``stride`` (:func:`resolve_density`)."""
        return resolve_density(self.runtime, iterations, stride, input_size)

    def id_density(self, fid: str) -> Density | None:
        """The density a feature id was issued for (None if it is not a feature id)."""
        parsed = parse_feature_id(fid)
        return parsed[1] if parsed else None

    def geometry(self, data: bytes) -> ImageGeometry:
        """How an upload maps onto the model input, from its header alone (no decode, no hash)."""
        header = read_header(data, self.settings.max_pixels)
        return ImageGeometry.plan(header.width, header.height, self.runtime.sizes, self.settings.resize_policy,
                                  float(self.runtime.patch_size))

    def plan(self, data: bytes) -> tuple[str, ImageGeometry]:
        geometry = self.geometry(data)
        return embedding_key(content_hash(data), geometry), geometry

    def planned_cells(self, data: bytes, iterations: int | None, stride: float | None) -> int:
        """Feature cells an upload gets at the density asked for, from its header alone."""
        geometry = self.geometry(data)
        density = self.density(iterations, stride, (geometry.input_height, geometry.input_width))
        step = density.stride or self.runtime.stride(density.iterations)
        return round(geometry.input_height / step) * round(geometry.input_width / step)

    def _model_input(self, data: bytes, geometry: ImageGeometry):
        # A JPEG decodes at the smallest DCT scale still at least the model input's content size.
        return geometry.prepare(decode_image(data, self.settings.max_pixels,
                                             at_least=(geometry.content_width, geometry.content_height)))

    def _store(self, entry: FeatureEntry) -> FeatureEntry:
        self.cache.put(entry)
        self.metrics.cache_bytes.set(self.cache.bytes_used)
        return entry

    def _native(self, embedding: Embedding, iterations: int, features: np.ndarray) -> FeatureEntry:
        geometry = dataclasses.replace(embedding.geometry, stride=float(self.runtime.stride(iterations)))
        density = Density(iterations)
        return self._store(FeatureEntry(with_density(embedding.id, density), features, geometry, density,
                                        embedding.image_bytes))

    async def _resampled(self, key: str, native: FeatureEntry, density: Density) -> FeatureEntry:
        """``native`` (the steps' own grid) resampled to ``density.stride`` (a thread: up to a second
        at pixel density)."""
        geometry = dataclasses.replace(native.geometry, stride=float(density.stride))
        features = await asyncio.to_thread(resample_features, native.features, geometry.grid_height,
                                           geometry.grid_width)
        return self._store(FeatureEntry(with_density(key, density), features, geometry, density,
                                        native.image_bytes))

    async def _finish(self, key: str, native: FeatureEntry, density: Density) -> FeatureEntry:
        return native if density.stride is None else await self._resampled(key, native, density)

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

    async def _densify(self, embedding: Embedding, density: Density,
                       is_gone: Callable[[], Awaitable[bool]] | None) -> FeatureEntry:
        """Features at ``density`` of a cached embedding: upsampler steps only, no backbone."""
        k = density.iterations
        if k == 0:
            features = embedding.coarse
        else:
            pixels = await self._decode(embedding.image_bytes, embedding.geometry)
            features = await self._submit(self.upsampler, (pixels, embedding.coarse), k, is_gone)
        return await self._finish(embedding.id, self._native(embedding, k, features), density)

    async def _decode(self, data: bytes, geometry: ImageGeometry, batch_key: tuple | None = None) -> np.ndarray:
        """The model input of an upload (a thread, within the decode gate's budget); ``batch_key``:
        announce it to the batcher, so that a batch about to close waits for this decode."""
        if batch_key is not None:
            self.batcher.expect(batch_key)
        try:
            with timed("decode"):  # waiting for the decode gate included: that is decode congestion
                async with self.decodes.admit(geometry.width * geometry.height):
                    return await asyncio.to_thread(self._model_input, data, geometry)
        finally:
            if batch_key is not None:
                self.batcher.unexpect(batch_key)

    async def from_upload(self, data: bytes, iterations: int | None = None, stride: float | None = None,
                          is_gone: Callable[[], Awaitable[bool]] | None = None) -> FeatureEntry:
        """Features of an uploaded image file at the density ``iterations`` or ``stride`` ask for
        (:meth:`density`): cached features, else the cached embedding plus upsampler steps, else
        decode, batch, run backbone and upsampler, and cache both."""
        with timed("read"):
            key, geometry = await asyncio.to_thread(self.plan, data)
        density = self.density(iterations, stride, (geometry.input_height, geometry.input_width))
        entry = await self._from_cache(key, density, is_gone)
        if entry is not None:
            return entry
        k = density.iterations
        batch_key = self.batcher.key((geometry.input_height, geometry.input_width), k)
        model_input = await self._decode(data, geometry, batch_key)
        # No await between unexpect (in _decode) and the enqueue inside submit: the worker never sees a gap.
        result = await self._submit(self.batcher, model_input, k, is_gone)
        embedding = Embedding(key, result[0], geometry, data)
        self.cache.put(embedding)
        return await self._finish(key, self._native(embedding, k, result[-1]), density)

    async def _from_cache(self, key: str, density: Density,
                          is_gone: Callable[[], Awaitable[bool]] | None) -> FeatureEntry | None:
        """Cached features of embedding ``key`` at ``density``, else made from what is cached (the
        steps' own grid resampled, or the embedding plus upsampler steps), else None."""
        entry = self.cache.get(with_density(key, density))
        if entry is not None:
            return entry
        if density.stride is not None:
            native = self.cache.get(with_density(key, Density(density.iterations)), count=False)
            if native is not None:
                return await self._resampled(key, native, density)
        embedding = self.cache.get(key, count=False)
        return None if embedding is None else await self._densify(embedding, density, is_gone)

    async def from_id(self, fid: str, iterations: int | None = None, stride: float | None = None,
                      is_gone: Callable[[], Awaitable[bool]] | None = None) -> FeatureEntry:
        """Features by id: at the id's own density unless ``iterations`` or ``stride`` asks for
        another, which is computed from the cached embedding (upsampler steps only). 404
        ``unknown_feature_id`` when neither the features nor the image's embedding is cached."""
        parsed = parse_feature_id(fid)
        entry = None
        if parsed is not None:
            key, issued = parsed
            if iterations is None and stride is None:
                iterations, stride = request_of(issued)
            entry = await self._from_cache(key, self.density(iterations, stride, key_input_size(key)), is_gone)
        if entry is None:
            raise ServiceError(404, "unknown_feature_id",
                               f"feature id {fid[:100]!r} is unknown or was evicted from the cache; "
                               "send the image again (the response carries a fresh id)")
        return entry


def feature_dtype(runtime) -> np.dtype:
    """The precision the runtime's features come in (and are cached in): float16 for a float16
    bundle, else float32 (also for runtimes that do not say)."""
    return np.dtype(getattr(runtime, "feature_dtype", np.float32))


def request_of(density: Density) -> tuple[int | None, float | None]:
    """``(iterations, stride)`` that ask for ``density`` again (on this image or another)."""
    return (density.iterations, None) if density.stride is None else (None, density.stride)
