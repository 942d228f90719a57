"""lift_serve.client against the real app (tiny ONNX bundle) served by uvicorn on 127.0.0.1.

Every client method runs against the live service; the retry tests put a transport in front of the
live server that answers 429/503 a set number of times first (the real queue cannot be made to
overflow on demand without flakiness), then forwards to the real server.
"""

from __future__ import annotations

import asyncio
import io
import socket
import time

import httpx
import numpy as np
import pytest
from lift_serve.client import AsyncLiftClient, LiftAPIError, LiftClient, Match, image_bytes
from live_server import live_server
from PIL import Image

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def textured(height: int, width: int, seed: int) -> np.ndarray:
    """uint8 [H, W, 3]: smooth colour gradients plus a few bright squares (not constant anywhere)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    img = np.stack([xx / width, yy / height, 0.5 + 0.5 * np.sin(xx / 7 + yy / 5)], axis=-1) * 200
    for _ in range(4):
        y, x = rng.integers(0, height - 12), rng.integers(0, width - 12)
        img[y:y + 12, x:x + 12] = rng.integers(0, 256, size=3)
    return img.clip(0, 255).astype(np.uint8)


def png(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def server_url(tiny_bundle):
    from lift_serve.service.app import create_app
    from lift_serve.service.settings import Settings

    app = create_app(Settings(bundle=tiny_bundle, providers="cpu", max_wait_ms=1))
    with live_server(app) as url:
        yield url


@pytest.fixture
def client(server_url):
    with LiftClient(server_url, timeout=20) as c:
        yield c


class Recorder(httpx.BaseTransport):
    """Forwards to the real server; records each request, and first answers ``fail`` canned responses."""

    def __init__(self, fail: list[httpx.Response] | None = None):
        self.inner = httpx.HTTPTransport()
        self.fail = list(fail or [])
        self.requests: list[httpx.Request] = []
        self.times: list[float] = []

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        request.read()
        self.requests.append(request)
        self.times.append(time.monotonic())
        if self.fail:
            return self.fail.pop(0)
        return self.inner.handle_request(request)


def busy(status: int, retry_after: str | None) -> httpx.Response:
    headers = {"Retry-After": retry_after} if retry_after is not None else {}
    code = "queue_full" if status == 429 else "unavailable"
    return httpx.Response(status, headers=headers, json={"error": {"code": code, "message": "queue is full"}})


# --------------------------------------------------------------------------------------------- models


def test_models_describes_the_bundle(client):
    info = client.models()
    assert info["demo"] is False
    assert "model" in info and "parameters" in info
    assert client.ready()


# --------------------------------------------------------------------------------------------- features


def test_features_shape_dtype_and_density(client):
    image = textured(64, 64, seed=1)
    f1 = client.features(image)
    assert f1.dtype == np.float32 and f1.ndim == 3
    f0 = client.features(image, iterations=0)
    # One LiFT iteration doubles the density of the backbone grid.
    assert f1.shape[0] == f0.shape[0]
    assert f1.shape[1:] == (2 * f0.shape[1], 2 * f0.shape[2])
    half = client.features(image, dtype="float16")
    assert half.dtype == np.float16
    np.testing.assert_allclose(half.astype(np.float32), f1, atol=2e-2 * float(np.abs(f1).max()))


def test_stride_asks_for_a_density_by_its_cell_size(client):
    image = textured(64, 64, seed=2)
    np.testing.assert_array_equal(client.features(image, stride=8), client.features(image, iterations=1))
    assert client.features(image, stride=12.8).shape == (32, 5, 5)  # resampled between 16 and 8
    assert client.extract(image, stride=12.8).stride == 12.8
    assert client.similarity(image, 30, 30, stride=12.8).shape == (5, 5)
    assert client.match(image, textured(64, 64, seed=3), stride=12.8)
    with pytest.raises(ValueError, match="iterations or stride, not both"):
        client.features(image, iterations=1, stride=8)
    with pytest.raises(LiftAPIError, match="whole cells"):
        client.features(image, stride=10)


def test_visualize_returns_the_pca_picture(client):
    image = textured(64, 96, seed=4)
    png_bytes = client.visualize(image, iterations=1)
    assert png_bytes.startswith(b"\x89PNG")
    both = client.visualize(image, compare=True, iterations=1)
    from PIL import Image

    assert Image.open(io.BytesIO(png_bytes)).size == (96, 64)
    assert Image.open(io.BytesIO(both)).size == (96 + 8 + 96, 64)


def test_every_image_kind_gives_the_same_features(client, tmp_path):
    array = textured(60, 80, seed=2)
    path = tmp_path / "img.png"
    path.write_bytes(png(array))
    reference = client.features(path)
    for kind in (str(path), path.read_bytes(), Image.fromarray(array), array):
        np.testing.assert_array_equal(client.features(kind), reference)
    grey = array.mean(axis=2).astype(np.uint8)
    # A grey array is sent as a one-channel PNG; the server replicates it to RGB.
    np.testing.assert_array_equal(client.features(grey), client.features(np.repeat(grey[..., None], 3, axis=2)))


def test_several_images_in_one_request(client):
    a, b = textured(64, 64, seed=3), textured(64, 64, seed=4)
    both = client.features([a, b])
    assert both.shape[0] == 2
    np.testing.assert_allclose(both[0], client.features(a), atol=1e-5)
    np.testing.assert_allclose(both[1], client.features(b), atol=1e-5)
    assert not np.allclose(both[0], both[1])


def test_each_image_of_a_batch_keeps_its_own_id_and_sizes(server_url):
    from lift_serve.client.lift_client import _features_result

    a, b = png(textured(60, 80, seed=20)), png(textured(64, 96, seed=21))
    response = httpx.post(f"{server_url}/v1/features", files=[("image", a), ("image", b)])
    first, second = _features_result(response)
    assert first.image_size == (80, 60) and second.image_size == (96, 64)
    assert first.feature_id != second.feature_id
    with LiftClient(server_url) as c:
        assert c.extract(b).feature_id == second.feature_id  # same content, same id


def test_extract_returns_the_mapping_info(client):
    result = client.extract(textured(60, 80, seed=5))
    assert result.feature_id
    assert result.image_size == (80, 60)  # (width, height) of the original
    assert result.input_size is not None and result.stride is not None
    h, w = result.input_size
    assert result.array.shape[1:] == (round(h / result.stride), round(w / result.stride))


# --------------------------------------------------------------------------------------------- similarity


def test_similarity_npy_peaks_at_the_clicked_cell(client):
    image = textured(64, 64, seed=6)
    feats = client.extract(image)
    x, y = 40.0, 20.0
    sim = client.similarity(image, x, y)
    assert sim.shape == feats.array.shape[1:]
    row, col = int(y // feats.stride), int(x // feats.stride)  # square policy, 64x64 in = 64x64 model input
    assert sim[row, col] == pytest.approx(1.0, abs=1e-3)
    assert sim.max() <= 1.0 + 1e-3
    other = client.similarity(image, 5.0, 60.0)
    assert not np.allclose(sim, other)


def test_similarity_png_is_at_the_original_size(client):
    image = textured(60, 80, seed=7)
    data = client.similarity(image, 10, 10, format="png")
    assert data[:8] == PNG_MAGIC
    assert Image.open(io.BytesIO(data)).size == (80, 60)
    blended = client.similarity(image, 10, 10, format="png", overlay=True)
    assert blended != data  # the overlay (off by default, as the server's) blends the image in
    assert Image.open(io.BytesIO(data)).mode == "P" and Image.open(io.BytesIO(blended)).mode == "RGB"
    fixed = client.similarity(image, 10, 10, format="png", scale="absolute")
    assert fixed != data and Image.open(io.BytesIO(fixed)).size == (80, 60)


def test_cross_image_similarity_uses_the_target_grid(client):
    a, b = textured(64, 64, seed=8), textured(64, 96, seed=9)
    sim = client.similarity(a, 30, 30, target=b)
    assert sim.shape == client.features(b).shape[1:]
    assert sim.shape != client.features(a).shape[1:]


def test_second_click_sends_the_feature_id_not_the_image(server_url):
    recorder = Recorder()
    image = png(textured(64, 64, seed=10))
    with LiftClient(server_url, transport=recorder) as c:
        first = c.similarity(image, 10, 10)
        second = c.similarity(image, 50, 50)
        by_id = c.similarity(None, 50, 50, feature_id=c.extract(image).feature_id)
    assert image in recorder.requests[0].content
    assert image not in recorder.requests[1].content
    assert len(recorder.requests[1].content) < len(image) / 4
    assert not np.allclose(first, second)
    np.testing.assert_array_equal(second, by_id)


def test_forgotten_feature_id_is_recovered_by_resending(server_url):
    recorder = Recorder()
    image = png(textured(64, 64, seed=11))
    with LiftClient(server_url, transport=recorder) as c:
        c._core.remember(image, (None, None), "0" * 64)  # as if the server had evicted what it once cached
        sim = c.similarity(image, 10, 10)
    assert sim.ndim == 2
    assert len(recorder.requests) == 2 and image in recorder.requests[1].content


# --------------------------------------------------------------------------------------------- match


def test_match_returns_sorted_matches_inside_both_images(client):
    a = textured(64, 96, seed=12)
    b = np.ascontiguousarray(a[:, ::-1])
    matches = client.match(a, b)
    assert matches and all(isinstance(m, Match) for m in matches)
    scores = [m.score for m in matches]
    assert scores == sorted(scores, reverse=True)
    for m in matches:
        assert 0 <= m.a[0] < 96 and 0 <= m.a[1] < 64
        assert 0 <= m.b[0] < 96 and 0 <= m.b[1] < 64
    assert len(client.match(a, b, max_matches=2)) == 2
    cut = scores[len(scores) // 2]
    assert all(m.score >= cut for m in client.match(a, b, min_score=cut))
    picture = client.match_image(a, b, max_matches=5)
    assert picture[:8] == PNG_MAGIC


def test_second_match_sends_ids_not_images(server_url):
    recorder = Recorder()
    a, b = png(textured(64, 64, seed=18)), png(textured(64, 96, seed=19))
    with LiftClient(server_url, transport=recorder) as c:
        first = c.match(a, b, max_matches=5)
        again = c.match(a, b, max_matches=5)
    assert a in recorder.requests[0].content and b in recorder.requests[0].content
    assert a not in recorder.requests[1].content and b not in recorder.requests[1].content
    assert again == first


# --------------------------------------------------------------------------------------------- errors


def test_server_errors_become_lift_api_errors(client):
    with pytest.raises(LiftAPIError) as err:
        client.features(b"this is not an image at all")
    assert err.value.status == 415 and err.value.code and "image" in err.value.message.lower()

    with pytest.raises(LiftAPIError) as err:
        client.similarity(textured(60, 80, seed=13), x=500, y=10)
    assert err.value.status == 422 and "80" in err.value.message  # names the image size

    with pytest.raises(LiftAPIError) as err:
        client.similarity(None, 1, 1, feature_id="f" * 64)
    assert (err.value.status, err.value.code) == (404, "unknown_feature_id")

    # And the server still answers.
    assert client.features(textured(64, 64, seed=14)).ndim == 3


def test_unreachable_server_is_a_lift_api_error():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # bound but not listening: connections are refused
        with LiftClient(f"http://127.0.0.1:{port}", timeout=2, retries=3) as c:
            with pytest.raises(LiftAPIError) as err:
                c.models()
    assert err.value.status == 0 and err.value.code == "connection_error"


def test_bad_local_input_is_refused_before_sending():
    with pytest.raises(ValueError, match="uint8"):
        image_bytes(np.zeros((8, 8, 3), dtype=np.float32))
    with pytest.raises(ValueError, match="shape"):
        image_bytes(np.zeros((8, 8, 2), dtype=np.uint8))
    with pytest.raises(TypeError, match="path, encoded bytes"):
        image_bytes(12345)


# --------------------------------------------------------------------------------------------- retries


def test_429_and_503_are_retried_after_retry_after(server_url):
    recorder = Recorder(fail=[busy(429, "0.2"), busy(503, "0.1")])
    with LiftClient(server_url, transport=recorder, retries=3) as c:
        info = c.models()
    assert "model" in info  # the real answer, after two refusals
    assert len(recorder.requests) == 3
    assert recorder.times[1] - recorder.times[0] >= 0.19
    assert recorder.times[2] - recorder.times[1] >= 0.09


def test_retries_are_bounded_and_then_raise(server_url):
    recorder = Recorder(fail=[busy(429, "30")] * 5)
    started = time.monotonic()
    with LiftClient(server_url, transport=recorder, retries=2, max_retry_wait=0.05) as c:
        with pytest.raises(LiftAPIError) as err:
            c.features(textured(64, 64, seed=15))
    assert (err.value.status, err.value.code, err.value.retry_after) == (429, "queue_full", 30.0)
    assert len(recorder.requests) == 3  # first try + 2 retries
    assert time.monotonic() - started < 5  # Retry-After: 30 was capped by max_retry_wait


def test_odd_retry_after_values_still_retry(server_url):
    """A malformed Retry-After (e.g. from a proxy) must not escape as a bare ValueError."""
    recorder = Recorder(fail=[busy(503, "soon"), busy(429, "Wed, 21 Oct 2015 07:28:00 GMT")])
    with LiftClient(server_url, transport=recorder, retries=2, max_retry_wait=0.05) as c:
        assert "model" in c.models()
    assert len(recorder.requests) == 3
    with LiftClient(server_url, transport=Recorder(fail=[busy(503, "soon")]), retries=0) as c:
        with pytest.raises(LiftAPIError) as err:
            c.models()
    assert (err.value.status, err.value.retry_after) == (503, None)


def test_other_errors_are_not_retried(server_url):
    recorder = Recorder()
    with LiftClient(server_url, transport=recorder, retries=3) as c:
        with pytest.raises(LiftAPIError):
            c.features(b"not an image")
    assert len(recorder.requests) == 1


# --------------------------------------------------------------------------------------------- async


def test_async_client_every_method(server_url):
    a, b = textured(64, 64, seed=16), textured(64, 96, seed=17)

    async def scenario():
        async with AsyncLiftClient(server_url, timeout=20) as c:
            info = await c.models()
            fa, fb = await asyncio.gather(c.features(a), c.features(b))
            extracted = await c.extract(a)
            sim = await c.similarity(a, 20, 20)
            cross = await c.similarity(a, 20, 20, target=b)
            matches = await c.match(a, b, max_matches=4)
            picture = await c.match_image(a, b, max_matches=4)
            with pytest.raises(LiftAPIError) as err:
                await c.features(b"garbage")
            return info, fa, fb, extracted, sim, cross, matches, picture, err.value

    info, fa, fb, extracted, sim, cross, matches, picture, error = asyncio.run(scenario())
    with LiftClient(server_url) as sync:
        np.testing.assert_array_equal(fa, sync.features(a))
    assert "model" in info
    np.testing.assert_array_equal(extracted.array, fa)
    assert sim.shape == fa.shape[1:] and cross.shape == fb.shape[1:]
    assert 0 < len(matches) <= 4 and picture[:8] == PNG_MAGIC
    assert error.status == 415


def test_async_retry_honours_retry_after(server_url):
    class AsyncRecorder(httpx.AsyncBaseTransport):
        def __init__(self):
            self.inner = httpx.AsyncHTTPTransport()
            self.fail = [busy(429, "0.2")]
            self.times: list[float] = []

        async def handle_async_request(self, request):
            self.times.append(time.monotonic())
            if self.fail:
                return self.fail.pop(0)
            return await self.inner.handle_async_request(request)

    recorder = AsyncRecorder()

    async def scenario():
        async with AsyncLiftClient(server_url, transport=recorder) as c:
            return await c.models()

    assert "model" in asyncio.run(scenario())
    assert len(recorder.times) == 2 and recorder.times[1] - recorder.times[0] >= 0.19


class SlowRuntime:
    """The real tiny runtime, made slow so that a queue of one overflows on demand."""

    def __init__(self, runtime, delay_s: float):
        self._runtime = runtime
        self._delay_s = delay_s

    def __getattr__(self, name):
        return getattr(self._runtime, name)

    def embed(self, images):  # the backbone pass: what every new image costs
        time.sleep(self._delay_s)
        return self._runtime.embed(images)

    def run(self, images, iterations=None):
        return self._runtime.upsample(images, self.embed(images), iterations)


def test_real_queue_overflow_is_retried(tiny_bundle):
    """The live app's own 429 (queue of one, 0.4 s per batch): without retries some of four concurrent
    requests fail with queue_full and a Retry-After; with retries all four succeed."""
    from lift_serve.service.app import create_app
    from lift_serve.service.ort_runtime import BundleRuntime
    from lift_serve.service.settings import Settings

    runtime = SlowRuntime(BundleRuntime(tiny_bundle, providers=("cpu",)), delay_s=0.4)
    settings = Settings(bundle=tiny_bundle, max_queue=1, max_batch_size=1, max_wait_ms=0)
    images = [textured(64, 64, seed=30 + i) for i in range(4)]

    async def burst(retries: int):
        async with AsyncLiftClient(url, retries=retries, max_retry_wait=0.5, timeout=20) as c:
            return await asyncio.gather(*(c.features(img) for img in images), return_exceptions=True)

    with live_server(create_app(settings, runtime=runtime)) as url:
        refused = asyncio.run(burst(retries=0))
        errors = [r for r in refused if isinstance(r, Exception)]
        assert errors, "a queue of one did not overflow under four concurrent requests"
        for error in errors:
            assert isinstance(error, LiftAPIError)
            assert (error.status, error.code) == (429, "queue_full") and error.retry_after >= 1
        served = asyncio.run(burst(retries=8))
    assert all(isinstance(r, np.ndarray) for r in served), served
