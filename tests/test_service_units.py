"""Service parts that need no model: geometry, codec, cache, batcher, settings."""

from __future__ import annotations

import asyncio
import io
import time

import numpy as np
import pytest
from lift_serve.service.batcher import BatchTimeoutError, MicroBatcher, QueueFullError
from lift_serve.service.cache import FeatureCache, FeatureEntry
from lift_serve.service.codec import ImageError, decode_image, read_header
from lift_serve.service.geometry import ImageGeometry, choose_input_size
from lift_serve.service.settings import Settings
from PIL import Image
from service_helpers import encode

SIZES = [(64, 64), (64, 96)]


# -- geometry ---------------------------------------------------------------------------------------
def test_choose_input_size_by_policy():
    assert choose_input_size(150, 100, SIZES, "square") == (64, 96)  # aspect 1.5 = 96/64
    assert choose_input_size(100, 100, SIZES, "square") == (64, 64)
    assert choose_input_size(100, 300, SIZES, "square") == (64, 64)  # tall: the square is closer in aspect
    # keep_aspect: the size the image fills most after an aspect-preserving scale
    assert choose_input_size(200, 100, SIZES, "keep_aspect") == (64, 96)
    assert choose_input_size(100, 300, SIZES, "keep_aspect") == (64, 64)
    with pytest.raises(ValueError, match="resize policy"):
        choose_input_size(10, 10, SIZES, "stretch")


def test_square_geometry_maps_points_cells_and_back():
    g = ImageGeometry.plan(150, 100, SIZES, "square", stride=8.0)
    assert (g.input_height, g.input_width, g.grid_height, g.grid_width) == (64, 96, 8, 12)
    assert g.content_grid == (8, 12)
    # (75, 50) -> input (48, 32) -> cell row 4, col 6; the cell's centre is 52 input px = 81.25 original x
    assert g.to_cell(75, 50) == (4, 6)
    assert g.cell_center(4, 6) == pytest.approx((52 / 0.64, 36 / 0.64))
    for x, y in [(0, 0), (149.9, 99.9), (33.3, 71.0)]:
        row, col = g.to_cell(x, y)
        cx, cy = g.cell_center(row, col)
        # a point and the centre of its cell are less than half a cell apart, in original pixels
        assert abs(cx - x) <= 0.5 * g.stride / g.scale_x + 1e-9
        assert abs(cy - y) <= 0.5 * g.stride / g.scale_y + 1e-9
    assert g.from_input(*g.to_input(12.5, 7.25)) == pytest.approx((12.5, 7.25))
    np.testing.assert_allclose(g.cell_centers(np.array([4, 0]), np.array([6, 11])),
                               [g.cell_center(4, 6), g.cell_center(0, 11)])
    with pytest.raises(ValueError, match="150x100"):
        g.to_cell(150, 10)
    with pytest.raises(ValueError, match="outside"):
        g.to_cell(-1, 10)


def test_keep_aspect_pads_bottom_right_and_excludes_padding_cells():
    g = ImageGeometry.plan(200, 50, SIZES, "keep_aspect", stride=8.0)  # scale 0.48 -> 96x24 content
    assert (g.input_height, g.input_width) == (64, 96)
    assert (g.content_width, g.content_height) == (96, 24)
    assert g.content_grid == (3, 12)
    assert g.content_box == (0.0, 0.0, 12.0, 3.0)
    image = Image.new("RGB", (200, 50), (200, 100, 50))
    pixels = g.prepare(image)
    assert pixels.shape == (64, 96, 3) and pixels.dtype == np.uint8
    assert (pixels[:24] == (200, 100, 50)).all() and (pixels[24:] == 0).all()
    assert g.to_cell(199, 49) == (2, 11)

    # 90x70 -> content 82x64: column 10 covers input 80..88, centred on padding; its points use column 9.
    g = ImageGeometry.plan(90, 70, SIZES, "keep_aspect", stride=8.0)
    assert (g.content_width, g.content_height, g.content_grid) == (82, 64, (8, 10))
    assert g.to_cell(89.5, 69.5) == (7, 9) and g.to_cell(75, 10) == (1, 8)
    cx, cy = g.cell_center(*g.to_cell(89.5, 69.5))
    assert g.contains(cx, cy)


# -- codec ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["L", "LA", "RGBA", "P", "CMYK", "I;16", "I", "F", "1"])
def test_decode_any_mode_to_rgb(mode):
    gradient = np.tile(np.linspace(0, 1, 32), (24, 1))
    if mode == "I;16":
        image = Image.fromarray((gradient * 65535).astype(np.uint16))
        assert image.mode == "I;16"
    elif mode == "I":
        image = Image.fromarray((gradient * 65535).astype(np.int32))
    elif mode == "F":
        image = Image.fromarray(gradient.astype(np.float32))
    else:
        image = Image.fromarray((gradient * 255).astype(np.uint8)).convert(mode)
    fmt = "TIFF" if mode in ("F", "I", "CMYK") else "PNG"
    rgb = decode_image(encode(image, fmt), max_pixels=10_000)
    assert rgb.mode == "RGB" and rgb.size == (32, 24)
    values = np.asarray(rgb)
    if mode not in ("1", "P"):  # a gradient stays a gradient from dark to light
        assert values[:, 0].mean() < 40 and values[:, -1].mean() > 215


def test_alpha_is_composited_over_white():
    image = Image.new("RGBA", (8, 8), (0, 0, 0, 0))
    assert (np.asarray(decode_image(encode(image), 1000)) == 255).all()


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP", "TIFF"])
def test_exif_orientation_is_applied_before_sizes(fmt):
    # Pillow's TIFF reader reports the oriented size itself: the header must not swap it twice.
    pixels = np.zeros((20, 40, 3), np.uint8)
    pixels[:10, :10] = 255  # a bright top-left corner, stored
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise when displayed
    data = encode(Image.fromarray(pixels), fmt, exif=exif)
    header = read_header(data, 10_000)
    assert (header.width, header.height) == (20, 40)
    decoded = np.asarray(decode_image(data, 10_000))
    assert decoded.shape == (40, 20, 3)
    assert decoded[:10, 10:].mean() > 200 and decoded[:10, :10].mean() < 50  # now top-right


def _textured_jpeg() -> bytes:
    pixels = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    return encode(Image.fromarray(pixels), "JPEG", quality=95)


def test_decode_errors_have_statuses():
    cases = {
        b"": (400, "empty_image"),
        b"certainly not an image": (415, "not_an_image"),
        encode(Image.new("RGB", (64, 64)), "JPEG")[:200]: (400, "corrupt_image"),  # header cut
        _textured_jpeg()[:-600]: (400, "corrupt_image"),  # pixel data cut
        encode(Image.new("RGB", (200, 100))): (413, "image_too_large"),
    }
    for data, (status, code) in cases.items():
        with pytest.raises(ImageError) as info:
            decode_image(data, max_pixels=10_000)
        assert (info.value.status, info.value.code) == (status, code)


# -- cache ------------------------------------------------------------------------------------------
def _entry(name: str, floats: int) -> FeatureEntry:
    g = ImageGeometry.plan(64, 64, SIZES, "square", 16.0)
    return FeatureEntry(name, np.zeros(floats, np.float32), g, 0, b"")


def test_cache_is_lru_bounded_by_bytes():
    hits, misses = [], []
    one = _entry("x", 1000).nbytes
    cache = FeatureCache(3 * one, on_hit=lambda: hits.append(1), on_miss=lambda: misses.append(1))
    for name in "abc":
        assert cache.put(_entry(name, 1000))
    assert cache.get("a") is not None  # a becomes most recent; b is now the oldest
    cache.put(_entry("d", 1000))
    assert "b" not in cache and {"a", "c", "d"} <= {k for k in "abcd" if k in cache}
    assert cache.bytes_used <= 3 * one
    assert cache.get("b") is None
    assert (len(hits), len(misses)) == (1, 1)
    assert not cache.put(_entry("huge", 10_000))  # larger than the whole budget: not stored
    assert len(cache) == 3


# -- batcher ----------------------------------------------------------------------------------------
def _fake_run(calls):
    def run(images, iterations):
        calls.append((images.shape, iterations))
        # features that identify their image: the mean pixel, as [B, 1, 1, 1]
        return images.reshape(len(images), -1).mean(axis=1).reshape(-1, 1, 1, 1).astype(np.float32)
    return run


def test_batcher_groups_by_size_and_iterations_and_returns_each_result():
    calls = []

    async def main():
        batcher = MicroBatcher(_fake_run(calls), max_batch_size=4, max_wait_s=0.2, max_queue=32)
        batcher.start()
        images = [np.full((8, 8, 3), i, np.uint8) for i in range(6)] + [np.full((8, 16, 3), 9, np.uint8)]
        jobs = [batcher.submit(img, 1) for img in images] + [batcher.submit(images[0], 0)]
        results = await asyncio.gather(*jobs)
        await batcher.stop()
        return results

    results = asyncio.run(main())
    assert [float(r.ravel()[0]) for r in results] == [0, 1, 2, 3, 4, 5, 9, 0]
    # each result owns its memory: a cached row must not pin the rest of its batch
    assert not np.shares_memory(results[0], results[1])
    assert sorted(calls) == sorted([((4, 8, 8, 3), 1), ((2, 8, 8, 3), 1), ((1, 8, 16, 3), 1), ((1, 8, 8, 3), 0)])


def test_batcher_queue_bound_timeout_and_failures():
    async def main():
        batcher = MicroBatcher(_fake_run([]), max_batch_size=8, max_wait_s=0.3, max_queue=2, timeout_s=5)
        batcher.start()
        image = np.zeros((4, 4, 3), np.uint8)
        first = [asyncio.ensure_future(batcher.submit(image, 0)) for _ in range(2)]
        await asyncio.sleep(0.01)
        with pytest.raises(QueueFullError) as info:
            await batcher.submit(image, 0)
        assert info.value.retry_after_s >= 1
        await asyncio.gather(*first)
        await batcher.stop()

        slow = MicroBatcher(_fake_run([]), max_batch_size=8, max_wait_s=1.0, max_queue=4, timeout_s=0.05)
        slow.start()
        with pytest.raises(BatchTimeoutError):
            await slow.submit(image, 0)
        await slow.stop()

        def broken(images, iterations):
            raise RuntimeError("boom")

        failing = MicroBatcher(broken, max_batch_size=2, max_wait_s=0.0, max_queue=4)
        failing.start()
        with pytest.raises(RuntimeError, match="boom"):
            await failing.submit(image, 0)
        with pytest.raises(RuntimeError, match="boom"):  # the worker survived the first failure
            await failing.submit(image, 0)
        await failing.stop()

    asyncio.run(main())


def test_batcher_drops_gone_clients_before_running():
    calls = []

    async def main():
        batcher = MicroBatcher(_fake_run(calls), max_batch_size=4, max_wait_s=0.05, max_queue=8)
        batcher.start()

        async def gone():
            return True

        from lift_serve.service.batcher import ClientGoneError

        with pytest.raises(ClientGoneError):
            await batcher.submit(np.zeros((4, 4, 3), np.uint8), 0, is_gone=gone)
        await batcher.stop()

    asyncio.run(main())
    assert calls == []


# -- settings ---------------------------------------------------------------------------------------
def test_settings_from_environment(monkeypatch):
    monkeypatch.setenv("LIFT_MAX_BATCH_SIZE", "16")
    monkeypatch.setenv("LIFT_BATCHING", "false")
    monkeypatch.setenv("LIFT_PROVIDERS", "tensorrt, cuda,cpu")
    monkeypatch.setenv("LIFT_CORS_ORIGINS", "http://a.example, http://b.example")
    monkeypatch.setenv("LIFT_RESIZE_POLICY", "keep_aspect")
    s = Settings()
    assert s.max_batch_size == 16 and s.effective_batch_size == 1
    assert s.provider_list == ["tensorrt", "cuda", "cpu"]
    assert s.cors_origin_list == ["http://a.example", "http://b.example"]
    assert s.resize_policy == "keep_aspect"
    defaults = Settings(_env_file=None, **{})
    monkeypatch.delenv("LIFT_MAX_BATCH_SIZE")
    assert Settings().max_batch_size == 8 and defaults.port == 8000 and defaults.max_pixels == 40_000_000
    assert str(Settings().demo_dir).endswith("lift-serve/demo-bundle")
    monkeypatch.setenv("LIFT_BUNDLE", "")
    assert Settings().bundle is None  # empty = unset, so startup says how to make a bundle


def test_similarity_with_cached_norms_equals_the_plain_computation():
    from lift_serve.service.matching import cell_norms, similarity_map

    features = np.random.default_rng(0).standard_normal((16, 5, 7)).astype(np.float32)
    query = features[:, 2, 3]
    fast = similarity_map(query, features, cell_norms(features))
    np.testing.assert_allclose(fast, similarity_map(query, features), atol=1e-6)
    assert abs(fast[2, 3] - 1) < 1e-6 and fast.max() <= 1 + 1e-6


def test_batcher_waits_for_announced_requests():
    calls = []

    async def main():
        batcher = MicroBatcher(_fake_run(calls), max_batch_size=4, max_wait_s=0.02, max_queue=8)
        batcher.start()
        image = np.zeros((8, 8, 3), np.uint8)
        key = batcher.key(image.shape, 0)
        batcher.expect(key)  # a second request is being decoded

        async def late():
            await asyncio.sleep(0.1)  # longer than max_wait, shorter than 10 x max_wait
            batcher.unexpect(key)
            return await batcher.submit(image, 0)

        await asyncio.gather(batcher.submit(image, 0), late())
        await batcher.stop()

    asyncio.run(main())
    assert calls == [((2, 8, 8, 3), 0)]  # one batch of both, not two of one


def test_batcher_waits_to_refill_the_previous_batch_size():
    calls = []

    def slow(images, iterations):
        time.sleep(0.3)  # the previous batch's time sets the refill wait: 10 % = 30 ms
        return _fake_run(calls)(images, iterations)

    async def main():
        batcher = MicroBatcher(slow, max_batch_size=4, max_wait_s=0.001, max_queue=8)
        batcher.start()
        image = np.zeros((8, 8, 3), np.uint8)
        await asyncio.gather(batcher.submit(image, 0), batcher.submit(image, 0))  # a batch of 2

        async def late():
            await asyncio.sleep(0.015)  # after max_wait (1 ms), within the refill wait (30 ms)
            return await batcher.submit(image, 0)

        await asyncio.gather(batcher.submit(image, 0), late())
        await batcher.stop()

    asyncio.run(main())
    assert [shape[0] for shape, _ in calls] == [2, 2]


def test_a_cache_budget_below_one_image_is_refused_at_startup(tiny_bundle):
    from lift_serve.service.features import FeatureService
    from lift_serve.service.metrics import ServiceMetrics
    from lift_serve.service.ort_runtime import BundleRuntime
    from lift_serve.service.settings import Settings

    runtime = BundleRuntime(tiny_bundle, providers=("cpu",), warmup=False)
    with pytest.raises(ValueError, match="LIFT_CACHE_BYTES=1000 cannot hold the features of one image"):
        FeatureService(runtime, Settings(bundle=tiny_bundle, cache_bytes=1000), ServiceMetrics())
    # caching off, and a budget that holds a few images, are both fine
    FeatureService(runtime, Settings(bundle=tiny_bundle, cache_bytes=0), ServiceMetrics())
    FeatureService(runtime, Settings(bundle=tiny_bundle, cache_bytes=1 << 20), ServiceMetrics())


def test_large_freed_blocks_go_back_to_the_system_on_glibc():
    import platform

    from lift_serve.memory import return_large_blocks_to_the_system

    taken = return_large_blocks_to_the_system()
    assert taken == (platform.libc_ver()[0] == "glibc")


@pytest.mark.parametrize("orientation", [1, 6])
def test_a_jpeg_decodes_at_the_smallest_scale_the_model_input_needs(orientation):
    """decode_image(at_least=...) lets a JPEG decode at 1/2, 1/4 or 1/8 in the DCT domain, never below
    the content size; the model input then differs from the full decode's by rounding only. EXIF
    orientation is respected (a photo stored on its side asks for the turned size)."""
    import io

    from lift_serve.service.codec import decode_image, read_header
    from lift_serve.service.geometry import ImageGeometry
    from PIL import Image

    rng = np.random.default_rng(orientation)
    yy, xx = np.mgrid[0:768, 0:1024]
    pixels = np.stack([(xx / 5) % 256, (yy / 4) % 256, ((xx + yy) / 7) % 256], -1)
    pixels = np.clip(pixels + rng.normal(0, 6, pixels.shape), 0, 255).astype(np.uint8)
    picture = Image.fromarray(pixels)
    exif = Image.Exif()
    exif[0x0112] = orientation
    buffer = io.BytesIO()
    picture.save(buffer, "JPEG", quality=92, exif=exif)
    data = buffer.getvalue()
    header = read_header(data, 40_000_000)
    geometry = ImageGeometry.plan(header.width, header.height, [(224, 224)], "keep_aspect", 16)
    wanted = (geometry.content_width, geometry.content_height)
    reduced = decode_image(data, 40_000_000, at_least=wanted)
    full = decode_image(data, 40_000_000)
    assert full.size == (header.width, header.height) == ((768, 1024) if orientation == 6 else (1024, 768))
    assert reduced.size[0] < full.size[0] and reduced.size[0] >= wanted[0] and reduced.size[1] >= wanted[1]
    difference = np.abs(geometry.prepare(reduced).astype(int) - geometry.prepare(full).astype(int))
    assert difference.mean() < 1.5 and difference.max() <= 40
    png = io.BytesIO()
    picture.save(png, "PNG")
    assert decode_image(png.getvalue(), 40_000_000, at_least=(10, 10)).size == (1024, 768)  # JPEG only


def test_a_click_on_a_draft_decoded_jpeg_maps_to_the_cell_of_the_full_image(client):
    """A 1600x1200 JPEG decodes at 1/8 scale (200x150, still above the 96x64 model input), yet the click
    maps through the header's geometry: the query cell is the full image's, and the map peaks there."""
    from lift_serve.service.codec import decode_image

    pixels = np.full((1200, 1600, 3), 40, np.uint8)
    pixels[600:900, 1000:1400] = 255  # a bright block: rows 4..5, cols 7..10 of the 8x12 grid at stride 8
    data = encode(pixels, "JPEG", quality=95)
    assert decode_image(data, 40_000_000, at_least=(96, 64)).size == (200, 150)  # the draft path
    x, y = 1200.0, 750.0
    r = client.post(f"/v1/similarity?x={x}&y={y}&format=npy", content=data, headers={"content-type": "image/jpeg"})
    assert r.status_code == 200, r.text
    row, col = int(y * 64 / 1200 // 8), int(x * 96 / 1600 // 8)
    assert r.headers["x-query-cell"] == f"row={row},col={col}" and r.headers["x-input-size"] == "96x64"
    sim = np.load(io.BytesIO(r.content))
    peak = np.unravel_index(int(np.argmax(sim)), sim.shape)
    assert 4 <= peak[0] <= 5 and 7 <= peak[1] <= 10
