"""Densities beyond the upsampler's own steps: an explicit ``stride``, the answer-size check before
inference, the budgets sized from the bundle and the upsampler run a few rows at a time.

The tiny bundle offers iterations 0 and 1 (strides 16 and 8) at 64x64 and 64x96. Between them,
stride 12.8 gives whole cells on 64x64 (5x5) but not on 64x96 (7.5 columns).
"""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from service_helpers import encode, make_app, metric, noise, started_client


def _npy(response) -> np.ndarray:
    assert response.status_code == 200, response.text
    return np.load(io.BytesIO(response.content), allow_pickle=False)


def _reference_resize(features: np.ndarray, height: int, width: int) -> np.ndarray:
    """PyTorch's antialiased bilinear resize: the filter the service documents (and the UPLiFT
    authors' ``outsize``)."""
    resized = F.interpolate(torch.from_numpy(features)[None], size=(height, width), mode="bilinear",
                            align_corners=False, antialias=True)
    return resized[0].numpy()


@pytest.mark.parametrize(("size", "out"), [((16, 16), (13, 13)), ((32, 24), (28, 21)), ((8, 8), (20, 11)),
                                           ((7, 9), (7, 3)), ((10, 10), (1, 1)), ((64, 64), (56, 40))])
def test_resampling_is_pytorchs_antialiased_bilinear(size, out):
    from lift_serve.service.resample import resample_features

    features = np.random.default_rng(0).standard_normal((40, *size)).astype(np.float32)  # > one channel chunk
    np.testing.assert_allclose(resample_features(features, *out), _reference_resize(features, *out), atol=2e-5)
    assert resample_features(features, *size) is features


def test_an_offered_stride_is_that_density(client):
    image = encode(noise(64, 64, seed=1))
    by_iterations = client.post("/v1/features?iterations=1", content=image, headers={"content-type": "image/png"})
    by_stride = client.post("/v1/features?stride=8", content=image, headers={"content-type": "image/png"})
    np.testing.assert_array_equal(_npy(by_stride), _npy(by_iterations))
    assert by_stride.headers["x-feature-id"] == by_iterations.headers["x-feature-id"]
    coarse = client.post("/v1/features?stride=16.0", content=image, headers={"content-type": "image/png"})
    assert _npy(coarse).shape == (32, 4, 4) and "-k0-" in coarse.headers["x-feature-id"]


def test_a_stride_between_densities_is_the_finer_one_resampled(client):
    image = encode(noise(64, 64, seed=2))
    fine = _npy(client.post("/v1/features?iterations=1", content=image, headers={"content-type": "image/png"}))
    r = client.post("/v1/features?stride=12.8", content=image, headers={"content-type": "image/png"})
    features = _npy(r)
    assert features.shape == (32, 5, 5)
    assert r.headers["x-feature-stride"] == "12.8" and r.headers["x-feature-shape"] == "32,5,5"
    np.testing.assert_allclose(features, _reference_resize(fine, 5, 5), atol=2e-5)
    fid = r.headers["x-feature-id"]
    assert "-k1s12.8-" in fid

    # The id answers again at its own stride (a cache hit); a click on it maps onto the 5x5 grid.
    hits = metric(client.get("/metrics").text, "lift_cache_hits_total")
    again = client.post(f"/v1/similarity?x=40&y=40&format=json&feature_id={fid}")
    assert again.status_code == 200, again.text
    body = again.json()
    assert body["shape"] == [5, 5] and body["query"]["cell"] == [3, 3] and body["feature_id"] == fid
    assert metric(client.get("/metrics").text, "lift_cache_hits_total") == hits + 1
    # ...and the same id at another density costs no backbone pass.
    images = metric(client.get("/metrics").text, "lift_images_total")
    other = client.post(f"/v1/similarity?x=40&y=40&format=npy&iterations=0&feature_id={fid}")
    assert _npy(other).shape == (4, 4)
    assert metric(client.get("/metrics").text, "lift_images_total") == images


def test_match_runs_both_sides_at_one_stride(client):
    a, b = encode(noise(64, 64, seed=3)), encode(noise(64, 64, seed=4))
    r = client.post("/v1/match?stride=12.8", files={"image_a": ("a.png", a), "image_b": ("b.png", b)})
    assert r.status_code == 200, r.text
    ids = r.json()["feature_id_a"], r.json()["feature_id_b"]
    assert all("-k1s12.8-" in fid for fid in ids)
    # Ids alone: both sides at the first id's density.
    again = client.post(f"/v1/match?feature_id_a={ids[0]}&feature_id_b={ids[1]}")
    assert again.status_code == 200 and again.json()["matches"] == r.json()["matches"]


@pytest.mark.parametrize(("query", "code", "words"), [
    ("stride=4", "invalid_parameter", "outside this bundle's range"),
    ("stride=32", "invalid_parameter", "outside this bundle's range"),
    ("stride=10", "invalid_parameter", "does not give whole cells on the 64x64 model input"),
    ("stride=8&iterations=1", "conflicting_parameters", "either iterations or stride"),
    ("stride=0", "invalid_parameter", "stride"),
    ("stride=abc", "invalid_parameter", "finite number"),
    ("stride=nan", "invalid_parameter", "finite number"),
])
def test_a_bad_stride_is_422_naming_the_problem(client, query, code, words):
    r = client.post(f"/v1/features?{query}", content=encode(noise(64, 64, seed=5)),
                    headers={"content-type": "image/png"})
    assert r.status_code == 422, r.text
    error = r.json()["error"]
    assert error["code"] == code and words in error["message"]


def test_a_stride_is_checked_against_each_images_own_input(client):
    wide = encode(noise(64, 96, seed=6))  # lands on 64x96: 12.8 gives 7.5 columns
    r = client.post("/v1/features?stride=12.8", content=wide, headers={"content-type": "image/png"})
    assert r.status_code == 422 and "64x96 model input" in r.json()["error"]["message"]
    square_id = client.post("/v1/features?stride=12.8", content=encode(noise(64, 64, seed=7)),
                            headers={"content-type": "image/png"}).headers["x-feature-id"]
    # The target is compared at the source's stride, which the wide target cannot take.
    r = client.post(f"/v1/similarity?x=1&y=1&feature_id={square_id}", files={"target": ("t.png", wide)})
    assert r.status_code == 422 and "64x96" in r.json()["error"]["message"]


def test_a_too_large_answer_is_refused_before_any_inference(tiny_bundle, runtime):
    # One 64x64 image at stride 8: 32 x 8 x 8 float32 = 8,192 bytes; two are over 10,000.
    with started_client(make_app(tiny_bundle, runtime, max_wait_ms=0, max_response_bytes=10_000)) as client:
        one = encode(noise(64, 64, seed=8))
        assert client.post("/v1/features", files={"image": ("a.png", one)}).status_code == 200
        images = metric(client.get("/metrics").text, "lift_images_total")
        two = [("image", (f"{seed}.png", encode(noise(64, 64, seed=seed)))) for seed in (9, 10)]
        r = client.post("/v1/features", files=two)
        assert r.status_code == 422 and r.json()["error"]["code"] == "response_too_large"
        assert "16384 bytes" in r.json()["error"]["message"] and "float16" in r.json()["error"]["message"]
        assert metric(client.get("/metrics").text, "lift_images_total") == images  # nothing ran
        assert client.post("/v1/features?dtype=float16", files=two).status_code == 200


class _FakeRuntime:
    """Sizes and densities of a big bundle (448 px, pixel-dense, 384 channels) without graphs."""

    channels, sizes, iterations, default_iterations, patch_size = 384, [(224, 224), (448, 448)], [0, 1, 2, 3, 4], 1, 16

    def stride(self, k):
        return 16 / 2**k

    def feature_size(self, height, width, k):
        return round(height / self.stride(k)), round(width / self.stride(k))


def test_budgets_left_unset_fit_the_bundles_densest_density(tiny_bundle):
    from lift_serve.service.features import DEFAULT_BUDGET_BYTES, FeatureService
    from lift_serve.service.metrics import ServiceMetrics
    from lift_serve.service.settings import Settings

    service = FeatureService(_FakeRuntime(), Settings(bundle=tiny_bundle), ServiceMetrics())
    pixel_dense = 384 * 448 * 448 * 4
    one_image = 384 * 28 * 28 * 4 + pixel_dense + 448 * 448 * 4
    assert service.cache_bytes == 2 * one_image and service.max_response_bytes == pixel_dense
    small = FeatureService(type("Small", (_FakeRuntime,), {"sizes": [(64, 64)]})(),
                           Settings(bundle=tiny_bundle), ServiceMetrics())
    assert small.cache_bytes == small.max_response_bytes == DEFAULT_BUDGET_BYTES
    with pytest.raises(ValueError, match="cannot hold the features of one image"):
        FeatureService(_FakeRuntime(), Settings(bundle=tiny_bundle, cache_bytes=pixel_dense), ServiceMetrics())


def test_large_rows_are_upsampled_a_few_at_a_time(tiny_bundle, runtime, monkeypatch):
    from lift_serve.service import features as features_module
    from lift_serve.service.features import FeatureService
    from lift_serve.service.metrics import ServiceMetrics
    from lift_serve.service.settings import Settings

    service = FeatureService(runtime, Settings(bundle=tiny_bundle), ServiceMetrics())
    images = np.stack([noise(64, 64, seed=s) for s in range(5)])
    coarse = runtime.embed(images)
    whole = runtime.upsample(images, coarse, 1)
    calls = []
    real = runtime.upsample
    monkeypatch.setattr(runtime, "upsample", lambda i, c, k: calls.append(len(i)) or real(i, c, k))
    monkeypatch.setattr(features_module, "UPSAMPLE_CHUNK_BYTES", 2 * 32 * 8 * 8 * 4)  # two rows a call
    np.testing.assert_array_equal(service._upsample((images, coarse), 1), whole)
    assert calls == [2, 2, 1]


def test_a_bundle_without_density_0_serves(tmp_path):
    """`lift export`'s default is --lift-iterations 1 alone: the backbone's own grid is not offered,
    but the service still plans images and sizes its cache on it."""
    from conftest import make_tiny_bundle
    from lift_serve.service.ort_runtime import BundleRuntime

    bundle = make_tiny_bundle(tmp_path / "k1", lift_iterations=(1,), sizes=[(64, 64)])
    runtime = BundleRuntime(bundle, providers="cpu")
    with started_client(make_app(bundle, runtime, max_wait_ms=0)) as client:
        r = client.post("/v1/features", content=encode(noise(64, 64, seed=30)), headers={"content-type": "image/png"})
        assert r.status_code == 200 and r.headers["x-feature-shape"] == "32,8,8"
        assert client.post(f"/v1/similarity?x=5&y=5&format=npy&feature_id={r.headers['x-feature-id']}").status_code \
            == 200
        r = client.post("/v1/features?iterations=0", content=encode(noise(64, 64, seed=30)),
                        headers={"content-type": "image/png"})
        assert r.status_code == 422 and "choose one of [1]" in r.json()["error"]["message"]


class _HalfRuntime:
    """The tiny bundle's runtime as a float16 bundle's would be: features in float16."""

    feature_dtype = np.dtype(np.float16)

    def __init__(self, runtime):
        self._runtime = runtime

    def __getattr__(self, name):
        return getattr(self._runtime, name)

    def embed(self, images):
        return self._runtime.embed(images).astype(np.float16)

    def upsample(self, images, coarse, iterations=None):
        return self._runtime.upsample(images, coarse.astype(np.float32), iterations).astype(np.float16)


def test_a_float16_bundle_is_cached_in_float16_at_half_the_bytes(tiny_bundle, runtime):
    """The cache keeps what the engine computed: a float16 bundle's entries are float16 (not widened),
    answered bit for bit, and the cache holds twice the images of a float32 bundle in the same budget."""
    from lift_serve.service.features import FeatureService
    from lift_serve.service.metrics import ServiceMetrics
    from lift_serve.service.settings import Settings

    half = _HalfRuntime(runtime)
    with started_client(make_app(tiny_bundle, half, max_wait_ms=0)) as client:
        png = encode(noise(64, 64, seed=41))
        r = client.post("/v1/features?dtype=float16", content=png, headers={"content-type": "image/png"})
        answered = np.load(io.BytesIO(r.content))
        expected = half.upsample(noise(64, 64, seed=41)[None], half.embed(noise(64, 64, seed=41)[None]), 1)[0]
        np.testing.assert_array_equal(answered, expected)
        service = client.app.state.service.features
        entry = service.cache.get(r.headers["x-feature-id"], count=False)
        assert entry.features.dtype == np.float16 and entry.nbytes == 32 * 8 * 8 * 2 + 8 * 8 * 4 + 1024
        # density 0 from the cached embedding (float16 as well), and float32 answers are the float16 widened
        r0 = client.post(f"/v1/similarity?feature_id={r.headers['x-feature-id']}&iterations=0&x=1&y=1&format=npy")
        assert service.cache.get(r0.headers["x-feature-id"], count=False).features.dtype == np.float16
        r32 = client.post("/v1/features", content=png, headers={"content-type": "image/png"})  # a cache hit
        np.testing.assert_array_equal(np.load(io.BytesIO(r32.content)), expected.astype(np.float32))

    # Capacity at one budget, for a ViT-S/16 + LiFT bundle at 448 (the cache's own accounting).
    fp32, fp16 = _FakeRuntime(), type("Half", (_FakeRuntime,), {"feature_dtype": np.dtype(np.float16)})()
    budget = 1 << 30
    images = [budget // FeatureService._largest_image_bytes(r).cached for r in (fp32, fp16)]
    assert images[1] / images[0] >= 1.99
    assert FeatureService(fp16, Settings(bundle=tiny_bundle), ServiceMetrics()).cache_bytes * 2 >= \
        FeatureService(fp32, Settings(bundle=tiny_bundle), ServiceMetrics()).cache_bytes  # unset budgets scale too
