"""Every endpoint of the service against the real tiny bundle (ONNX Runtime on CPU), in-process."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image
from service_helpers import blocks, encode, make_app, metric, noise, png_declaring, started_client


def _npy(response) -> np.ndarray:
    assert response.status_code == 200, response.text
    return np.load(io.BytesIO(response.content), allow_pickle=False)


def _ok_after(client) -> None:
    """The server still answers a good request."""
    r = client.post("/v1/features", content=encode(noise(64, 64, seed=99)), headers={"content-type": "image/png"})
    assert r.status_code == 200


# -- info -------------------------------------------------------------------------------------------
def test_health_models_metrics_docs(client):
    assert client.get("/healthz").json() == {"status": "ok"}
    assert client.get("/readyz").json() == {"status": "ready", "demo": False, "provider": "CPUExecutionProvider"}
    body = client.get("/v1/models").json()
    # Not a demo, but the tiny bundle's backbone is random and its LiFT untrained: said as for a demo.
    assert body["demo"] is False and body["random_weights"] == ["backbone", "upsampler"]
    assert body["warning"].startswith("UNTRAINED WEIGHTS: the backbone's weights are random and the upsampler")
    model = body["model"]
    assert model["channels"] == 32 and model["strides"] == {"0": 16.0, "1": 8.0}
    assert model["input_sizes"] == [{"height": 64, "width": 64}, {"height": 64, "width": 96}]
    assert model["providers"] == ["CPUExecutionProvider"]
    assert body["parameters"]["iterations"] == {"allowed": [0, 1], "default": 1}
    text = client.get("/metrics").text
    for name in ("lift_requests_total", "lift_request_seconds_bucket", "lift_queue_depth", "lift_batch_size_bucket",
                 "lift_inference_seconds_bucket", "lift_cache_hits_total", "lift_cache_misses_total"):
        assert name in text
    assert metric(text, 'lift_requests_total{endpoint="/v1/models",status="200"}') >= 1
    schema = client.get("/openapi.json").json()
    for path in ("/v1/features", "/v1/similarity", "/v1/match", "/v1/models"):
        assert path in schema["paths"]
    params = {p["name"]: p for p in schema["paths"]["/v1/similarity"]["post"]["parameters"]}
    assert params["x"]["description"].startswith("point x in the ORIGINAL") and params["x"]["schema"]["examples"]
    assert "multipart/form-data" in schema["paths"]["/v1/match"]["post"]["requestBody"]["content"]
    # /docs without a CDN: the page loads Swagger UI from the server itself.
    docs = client.get("/docs")
    assert docs.status_code == 200 and "/docs/assets/swagger-ui-bundle.js" in docs.text
    assert "cdn." not in docs.text and "unpkg" not in docs.text
    script = client.get("/docs/assets/swagger-ui-bundle.js")
    assert script.status_code == 200 and len(script.content) > 100_000
    assert client.get("/docs/assets/swagger-ui.css").status_code == 200 and client.get("/redoc").status_code == 404


def test_openapi_declares_every_answer_shape_and_header(client):
    schema = client.get("/openapi.json").json()
    components = schema["components"]["schemas"]
    for name in ("ErrorBody", "FeaturesJSON", "SimilarityJSON", "MatchJSON", "Models", "Health", "Ready"):
        assert name in components, name
    ok = {path: schema["paths"][path]["post"]["responses"]["200"] for path in ("/v1/features", "/v1/similarity",
                                                                               "/v1/match")}
    assert set(ok["/v1/features"]["headers"]) >= {"X-Feature-Id", "X-Feature-Shape", "X-Feature-Stride",
                                                   "X-Input-Size", "X-Image-Size"}
    assert "X-Query-Cell" in ok["/v1/similarity"]["headers"] and "X-Feature-Id-B" in ok["/v1/match"]["headers"]
    assert ok["/v1/match"]["content"]["application/json"]["schema"]["$ref"].endswith("/MatchJSON")
    error = schema["paths"]["/v1/match"]["post"]["responses"]["429"]["content"]["application/json"]["schema"]
    assert error["$ref"].endswith("/ErrorBody")
    models = schema["paths"]["/v1/models"]["get"]["responses"]["200"]["content"]["application/json"]["schema"]
    assert models["$ref"].endswith("/Models")
    # the answers themselves have the declared shapes
    from lift_serve.service.schemas import MatchJSON, Models

    Models.model_validate(client.get("/v1/models").json())
    data = encode(blocks(64, 64, seed=2))
    MatchJSON.model_validate(client.post("/v1/match", files={"image_a": ("a.png", data),
                                                             "image_b": ("b.png", data)}).json())


def test_not_ready_until_loaded_and_missing_bundle_message(tiny_bundle, monkeypatch, capsys):
    from fastapi.testclient import TestClient
    from lift_serve.service.app import create_app
    from lift_serve.service.settings import Settings

    from lift_serve import cli as lift_cli

    unstarted = TestClient(create_app(Settings(bundle=tiny_bundle)))  # no lifespan: model never loaded
    assert unstarted.get("/healthz").status_code == 200
    r = unstarted.get("/readyz")
    assert r.status_code == 503 and r.json()["error"]["code"] == "not_ready" and r.headers["retry-after"]
    r = unstarted.post("/v1/features", content=encode(noise(64, 64)), headers={"content-type": "image/png"})
    assert r.status_code == 503

    for name in ("LIFT_BUNDLE", "LIFT_DEMO"):
        monkeypatch.delenv(name, raising=False)
    assert lift_cli.main(["serve"]) == 2
    err = capsys.readouterr().err
    assert "lift export" in err and "--demo" in err and "Traceback" not in err
    assert lift_cli.main(["serve", "--bundle", str(tiny_bundle.parent / "nowhere")]) == 2
    assert "nowhere" in capsys.readouterr().err


def test_serve_exits_2_when_the_bundle_cannot_load(tiny_bundle, tmp_path, capsys):
    """A manifest without its graphs passes the startup check; the failed load must stop `lift serve`."""
    import shutil

    from lift_serve import cli as lift_cli

    shutil.copy(tiny_bundle / "manifest.json", tmp_path / "manifest.json")
    assert lift_cli.main(["serve", "--bundle", str(tmp_path), "--port", "0", "--log-level", "error"]) == 2
    err = capsys.readouterr().err
    assert "error: cannot serve" in err and "missing" in err and "Traceback" not in err


def test_serve_exits_2_when_the_port_is_taken(tiny_bundle, capsys):
    import socket

    from lift_serve import cli as lift_cli

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert lift_cli.main(["serve", "--bundle", str(tiny_bundle), "--port", str(port), "--log-level", "error"]) == 2
    err = capsys.readouterr().err
    assert f"cannot listen on 127.0.0.1:{port}" in err and "--port" in err and "Traceback" not in err


# -- features ---------------------------------------------------------------------------------------
def test_features_npy_equal_the_runtime_on_the_planned_input(client, runtime):
    from lift_serve.service.codec import decode_image
    from lift_serve.service.geometry import ImageGeometry

    pixels = noise(100, 150, seed=3)
    data = encode(pixels)
    r = client.post("/v1/features", files={"image": ("a.png", data, "image/png")})
    features = _npy(r)
    assert features.shape == (32, 8, 12) and features.dtype == np.float32
    assert r.headers["x-feature-shape"] == "32,8,12"
    assert r.headers["x-feature-stride"] == "8"
    assert r.headers["x-input-size"] == "96x64" and r.headers["x-image-size"] == "150x100"  # both WxH
    geometry = ImageGeometry.plan(150, 100, runtime.sizes, "square", runtime.stride(1))
    expected = runtime.run(geometry.prepare(decode_image(data, 10**6))[None], 1)[0]
    np.testing.assert_array_equal(features, expected)

    half = _npy(client.post("/v1/features?dtype=float16&iterations=0", content=data,
                            headers={"content-type": "image/png"}))
    assert half.dtype == np.float16 and half.shape == (32, 4, 6)
    expected0 = runtime.run(geometry.prepare(decode_image(data, 10**6))[None], 0)[0]
    np.testing.assert_allclose(half.astype(np.float32), expected0, rtol=1e-3, atol=1e-3)


def test_each_answer_says_where_its_time_went(client):
    """Server-Timing: an upload goes through every stage, and its stages sum to no more than its total;
    a click on cached features runs no inference; the same seconds reach lift_stage_seconds."""
    from lift_serve.service.timing import parse_header

    before = metric(client.get("/metrics").text, 'lift_stage_seconds_count{stage="decode"}')
    r = client.post("/v1/features", content=encode(noise(64, 64, seed=77), "JPEG"),
                    headers={"content-type": "image/jpeg"})
    stages = parse_header(r.headers["server-timing"])
    assert set(stages) == {"read", "decode", "queue", "inference", "encode", "total"}
    assert min(stages.values()) >= 0 and stages["inference"] > 0
    assert sum(v for k, v in stages.items() if k != "total") <= stages["total"] * 1.01 + 0.05
    assert metric(client.get("/metrics").text, 'lift_stage_seconds_count{stage="decode"}') == before + 1
    fid = r.headers["x-feature-id"]
    click = client.post(f"/v1/similarity?feature_id={fid}&x=3&y=3&format=npy")
    assert set(parse_header(click.headers["server-timing"])) == {"encode", "total"}


def test_features_several_images_json_and_cache(client):
    a, b = encode(noise(64, 64, seed=4)), encode(noise(64, 64, seed=5))
    r = client.post("/v1/features", files=[("image", ("a.png", a)), ("image", ("b.png", b))])
    both = _npy(r)
    assert both.shape == (2, 32, 8, 8)
    ids = r.headers["x-feature-id"].split(",")
    assert len(ids) == 2 and ids[0] != ids[1]
    single = _npy(client.post("/v1/features", files={"image": ("b.png", b)}))
    np.testing.assert_array_equal(both[1], single)

    hits = metric(client.get("/metrics").text, "lift_cache_hits_total")
    r = client.post("/v1/features?format=json", files={"image": ("a.png", a)})
    item = r.json()["features"][0]
    assert item["id"] == ids[0] and item["shape"] == [32, 8, 8] and item["stride"] == 8.0
    assert item["image_size"] == {"width": 64, "height": 64}
    np.testing.assert_allclose(np.array(item["data"], np.float32), both[0], rtol=1e-6)
    assert metric(client.get("/metrics").text, "lift_cache_hits_total") == hits + 1

    r = client.post("/v1/features", files=[("image", ("a.png", a)), ("image", ("t.txt", b"not an image at all"))])
    assert r.status_code == 415 and r.json()["error"]["message"].startswith("image 2 of 2")
    mixed = [("image", ("a.png", a)), ("image", ("w.png", encode(noise(64, 96))))]
    r = client.post("/v1/features", files=mixed)
    assert r.status_code == 422 and r.json()["error"]["code"] == "mixed_input_sizes"
    r = client.post("/v1/features?format=json", files=mixed)
    assert [f["shape"] for f in r.json()["features"]] == [[32, 8, 8], [32, 8, 12]]


# -- similarity -------------------------------------------------------------------------------------
def _square_image(width=150, height=100, box=(60, 30, 90, 60)):
    pixels = np.full((height, width, 3), 90, np.uint8)
    x0, y0, x1, y1 = box
    pixels[y0:y1, x0:x1] = 255
    return pixels


@pytest.mark.parametrize("policy", ["square", "keep_aspect"])
def test_click_on_a_bright_square_lights_up_the_square(tiny_bundle, runtime, policy):
    box = (60, 30, 90, 60)
    data = encode(_square_image(box=box))
    with started_client(make_app(tiny_bundle, runtime, max_wait_ms=0, resize_policy=policy)) as client:
        r = client.post("/v1/similarity?x=75&y=45&overlay=false", files={"image": ("s.png", data)})
        assert r.status_code == 200 and r.headers["content-type"] == "image/png"
        heat = np.asarray(Image.open(io.BytesIO(r.content)).convert("RGB"), dtype=np.float64)
        assert heat.shape == (100, 150, 3)  # at the original image's size
        # The ramp's top (similarity 1) is yellow: highest red + green; its pixels must lie on the square.
        warmth = heat[..., 0] + heat[..., 1] - heat[..., 2]
        ys, xs = np.nonzero(warmth >= warmth.max() - 1e-9)
        assert (box[0] <= xs).all() and (xs < box[2]).all() and (box[1] <= ys).all() and (ys < box[3]).all()

        fid = r.headers["x-feature-id"]
        row, col = (int(part.split("=")[1]) for part in r.headers["x-query-cell"].split(","))
        assert r.headers["x-query-cell"] == f"row={row},col={col}"
        sim = _npy(client.post(f"/v1/similarity?x=75&y=45&format=npy&feature_id={fid}"))
        assert sim[row, col] == 1.0 and sim.max() == 1.0 and sim.min() >= -1.0
        info = client.post(f"/v1/similarity?x=75&y=45&format=json&feature_id={fid}").json()
        assert info["query"]["cell"] == [row, col]
        cx, cy = info["query"]["cell_center"]
        assert box[0] <= cx < box[2] and box[1] <= cy < box[3]
        np.testing.assert_array_equal(np.array(info["similarity"], np.float32), sim)
        blended = client.post(f"/v1/similarity?x=75&y=45&overlay=true&alpha=0.5&feature_id={fid}")
        assert blended.status_code == 200 and Image.open(io.BytesIO(blended.content)).size == (150, 100)

        # The colour scale is stated: auto = the map's own range over the image, absolute = -1 to 1.
        low, high = map(float, r.headers["x-colour-range"].split(","))
        assert high == 1.0 and float(sim.min()) - 1e-6 <= low < high  # keep_aspect: the cells on the image only
        if policy == "square":
            assert low == pytest.approx(float(sim.min()), rel=1e-5)
        assert info["colour_range"] == {"scale": "auto", "low": pytest.approx(low, rel=1e-5), "high": 1.0}
        fixed = client.post(f"/v1/similarity?x=75&y=45&scale=absolute&feature_id={fid}")
        assert fixed.headers["x-colour-range"] == "-1,1"
        levels = np.asarray(Image.open(io.BytesIO(fixed.content)))  # palette indices: 0 = -1, 255 = +1
        assert levels.max() == 255 and levels.min() >= round((low + 1) / 2 * 255) - 1
        assert client.post(f"/v1/similarity?x=75&y=45&scale=log&feature_id={fid}").status_code == 422


def test_cross_image_similarity_follows_a_rescaled_copy(client):
    pixels = blocks(64, 96, seed=2)
    big = np.asarray(Image.fromarray(pixels).resize((192, 128), Image.Resampling.NEAREST))
    r = client.post("/v1/features", files={"image": ("big.png", encode(big))})
    target_id = r.headers["x-feature-id"]
    hits = 0
    points = [(12, 12), (44, 20), (76, 36), (20, 52), (60, 44), (84, 12)]
    for x, y in points:
        r = client.post(f"/v1/similarity?x={x}&y={y}&format=json",
                        files={"image": ("a.png", encode(pixels))}, data={"target_id": target_id})
        body = r.json()
        assert r.headers["x-target-feature-id"] == target_id
        # the map lies on the target's grid; the headers say how (as /v1/features does)
        assert (r.headers["x-image-size"], r.headers["x-input-size"], r.headers["x-feature-stride"]) == (
            "192x128", "96x64", "8")
        sim = np.array(body["similarity"])
        assert sim.shape == (8, 12)
        row, col = np.unravel_index(int(sim.argmax()), sim.shape)
        stride_px = body["target"]["stride"] * 2  # target cells are 16 original pixels wide
        tx, ty = (col + 0.5) * stride_px, (row + 0.5) * stride_px
        ax, ay = body["query"]["cell_center"]
        hits += abs(tx - 2 * ax) <= stride_px and abs(ty - 2 * ay) <= stride_px
    assert hits >= len(points) - 1


# -- match ------------------------------------------------------------------------------------------
def _match(client, a: bytes, b: bytes, **params):
    r = client.post("/v1/match", params=params, files={"image_a": ("a.png", a), "image_b": ("b.png", b)})
    assert r.status_code == 200, r.text
    return r.json()


def test_matches_on_a_shifted_copy_land_one_cell_away_at_most(client):
    pixels = blocks(64, 96, seed=1)
    shifted = np.roll(pixels, 16, axis=1)  # 16 px right; the right edge wraps to the left
    body = _match(client, encode(pixels), encode(shifted), max_matches=60)
    matches = body["matches"]
    assert body["count"] == len(matches) >= 20
    assert body["image_a_size"] == {"width": 96, "height": 64}
    scores = [m["score"] for m in matches]
    assert scores == sorted(scores, reverse=True) and all(-1 <= s <= 1 for s in scores)
    inner = [m for m in matches if m["a"][0] + 16 < 96]
    good = [abs(m["b"][0] - m["a"][0] - 16) <= 8 and abs(m["b"][1] - m["a"][1]) <= 8 for m in inner]
    assert np.mean(good) >= 0.9
    # coordinates are cell centres: 4 + 8k in a 96x64 image that is its own model input
    assert all((m["a"][0] - 4) % 8 == 0 and (m["a"][1] - 4) % 8 == 0 for m in matches)
    assert len(_match(client, encode(pixels), encode(shifted), max_matches=5)["matches"]) == 5
    assert all(m["score"] >= 0.9 for m in _match(client, encode(pixels), encode(shifted), min_score=0.9)["matches"])


def test_matches_on_a_rescaled_copy_map_back_to_each_original(client):
    pixels = blocks(64, 96, seed=3)
    big = np.asarray(Image.fromarray(pixels).resize((192, 128), Image.Resampling.NEAREST))
    body = _match(client, encode(pixels), encode(big))
    assert body["image_b_size"] == {"width": 192, "height": 128}
    good = [abs(m["b"][0] - 2 * m["a"][0]) <= 16 and abs(m["b"][1] - 2 * m["a"][1]) <= 16 for m in body["matches"]]
    assert len(good) >= 20 and np.mean(good) >= 0.9
    r = client.post("/v1/match?format=png", data={"feature_id_a": body["feature_id_a"],
                                                  "feature_id_b": body["feature_id_b"]})
    assert r.status_code == 200 and r.headers["content-type"] == "image/png"
    assert Image.open(io.BytesIO(r.content)).size == (192 + 192, 128)  # side by side at the taller height


def test_another_density_of_a_known_image_runs_only_the_upsampler(tiny_bundle, runtime):
    """A feature id names its image's cached embedding: asking it at another density (or comparing it
    with an id of another density) costs upsampler steps, never a second backbone pass."""
    with started_client(make_app(tiny_bundle, runtime, max_wait_ms=0)) as client:
        pipeline = client.app.state.service.features
        data = encode(blocks(64, 64, seed=6))
        r0 = client.post("/v1/features?iterations=0", files={"image": ("a.png", data)})
        coarse = _npy(r0)
        id0 = r0.headers["x-feature-id"]
        backbone_runs = pipeline.batcher.images_run
        assert backbone_runs == 1 and pipeline.upsampler.images_run == 0
        # density 1 of the same image by id: the upsampler only, and the same numbers as a fresh upload
        r = client.post("/v1/similarity?x=5&y=5&format=npy&iterations=1", data={"feature_id": id0})
        assert _npy(r).shape == (8, 8) and r.headers["x-feature-id"] == id0.replace("-k0-", "-k1-")
        assert (pipeline.batcher.images_run, pipeline.upsampler.images_run) == (backbone_runs, 1)
        r1 = client.post("/v1/features?iterations=1", files={"image": ("a.png", data)})
        embedding = pipeline.cache.get(id0.replace("-k0-", "-"), count=False)
        pixels = pipeline._model_input(embedding.image_bytes, embedding.geometry)  # what the upsampler was given
        np.testing.assert_array_equal(_npy(r1), runtime.run(pixels[None], 1)[0])
        assert (pipeline.batcher.images_run, pipeline.upsampler.images_run) == (backbone_runs, 1)  # cached
        id1 = r1.headers["x-feature-id"]
        # ids of two densities: compared at the source's (similarity) or the first id's (match) density
        r = client.post("/v1/similarity?x=5&y=5&format=npy", data={"feature_id": id0, "target_id": id1})
        assert _npy(r).shape == coarse.shape[1:] and r.headers["x-target-feature-id"] == id0
        r = client.post("/v1/match", data={"feature_id_a": id0, "feature_id_b": id1})
        assert r.status_code == 200 and r.json()["feature_id_b"] == id0
        assert pipeline.batcher.images_run == backbone_runs
        # An upload next to an id is computed with the id's iterations: stride 16, cell centres at 8 + 16k.
        r = client.post("/v1/match", data={"feature_id_a": id0}, files={"image_b": ("b.png", data)})
        matches = r.json()["matches"]
        assert r.status_code == 200 and matches and r.headers["x-feature-id-b"] == id0
        assert all((m["b"][0] - 8) % 16 == 0 and (m["b"][1] - 8) % 16 == 0 for m in matches)
        # an id whose features and embedding are both unknown is still a 404
        r = client.post("/v1/similarity?x=5&y=5&iterations=1", data={"feature_id": "0" * 32 + "-k0-sq-64x64"})
        assert r.status_code == 404 and r.json()["error"]["code"] == "unknown_feature_id"


# -- bad input --------------------------------------------------------------------------------------
def _cmyk_jpeg() -> bytes:
    return encode(Image.fromarray(noise(64, 64)).convert("CMYK"), "JPEG")


def _png16() -> bytes:
    image = Image.fromarray((np.linspace(0, 65535, 64 * 64).reshape(64, 64)).astype(np.uint16))
    assert image.mode == "I;16"
    return encode(image)


def test_16_bit_and_cmyk_images_work(client):
    for data in (_png16(), _cmyk_jpeg()):
        assert _npy(client.post("/v1/features", files={"image": ("x", data)})).shape == (32, 8, 8)


RAW = {"content-type": "image/png"}
BAD_REQUESTS = [
    ("empty body", dict(url="/v1/features", content=b"", headers=RAW), 400, "empty_body"),
    ("no body, no type", dict(url="/v1/features"), 400, "empty_body"),
    ("non-image bytes", dict(url="/v1/features", content=b"hello, world" * 10, headers=RAW), 415, "not_an_image"),
    ("truncated jpeg", dict(url="/v1/features", files={"image": ("t.jpg", encode(noise(64, 64), "JPEG")[:-900])}),
     400, "corrupt_image"),
    ("bomb", dict(url="/v1/features", content=png_declaring(100_000, 100_000), headers=RAW), 413, "image_too_large"),
    ("wrong content type", dict(url="/v1/features", content=b"x" * 20, headers={"content-type": "text/plain"}),
     415, "unsupported_media_type"),
    ("unknown query", dict(url="/v1/features?iteration=1", content=b"x", headers=RAW), 422, "unknown_parameter"),
    ("unknown form field", dict(url="/v1/features", files={"picture": ("p.png", b"x")}), 422, "unknown_field"),
    ("text instead of a file", dict(url="/v1/features", data={"image": "photo.jpg"}), 422, "not_a_file"),
    ("format as a form field", dict(url="/v1/similarity?x=1&y=1", data={"format": "json"},
                                    files={"image": ("s.png", encode(noise(64, 64)))}), 422, "unknown_field"),
    ("bad value", dict(url="/v1/features?format=xml", content=b"x", headers=RAW), 422, "invalid_parameter"),
    ("iterations not offered", dict(url="/v1/features?iterations=3", content=encode(noise(64, 64)), headers=RAW),
     422, "invalid_parameter"),
    ("x outside", dict(url="/v1/similarity?x=150&y=10", files={"image": ("s.png", encode(noise(100, 150)))}),
     422, "point_outside_image"),
    ("y negative", dict(url="/v1/similarity?x=1&y=-0.5", files={"image": ("s.png", encode(noise(100, 150)))}),
     422, "point_outside_image"),
    ("missing x", dict(url="/v1/similarity?y=1", files={"image": ("s.png", encode(noise(64, 64)))}),
     422, "invalid_parameter"),
    ("alpha range", dict(url="/v1/similarity?x=1&y=1&alpha=2", files={"image": ("s.png", encode(noise(64, 64)))}),
     422, "invalid_parameter"),
    ("unknown feature id", dict(url="/v1/similarity?x=1&y=1&feature_id=0123-k1-sq-64x64"), 404, "unknown_feature_id"),
    ("match without b", dict(url="/v1/match", files={"image_a": ("a.png", encode(noise(64, 64)))}),
     400, "missing_image"),
    ("match raw body", dict(url="/v1/match", content=encode(noise(64, 64)), headers=RAW), 415,
     "unsupported_media_type"),
    ("unknown route", dict(url="/v1/nothing"), 404, "not_found"),
    ("wrong method", dict(url="/v1/models"), 405, "method_not_allowed"),
]


@pytest.mark.parametrize("request_kwargs, status, code", [c[1:] for c in BAD_REQUESTS],
                         ids=[c[0] for c in BAD_REQUESTS])
def test_bad_requests_get_json_errors_and_the_server_goes_on(client, request_kwargs, status, code):
    r = client.post(**request_kwargs)
    assert (r.status_code, r.json()["error"]["code"]) == (status, code), r.text
    message = r.json()["error"]["message"]
    assert message and "Traceback" not in message
    if code == "point_outside_image":
        assert "150x100" in message
    if code == "unknown_field" and "data" in request_kwargs:
        assert "'format' is a query parameter" in message and "/v1/similarity?format=json" in message
    if "y=1" in request_kwargs["url"] and "x=" not in request_kwargs["url"]:
        assert "x: required query parameter" in message and "?x=" in message
    if code == "not_a_file":
        assert "-F image=@photo.jpg" in message
    if code == "not_found":
        assert "/v1/nothing" in message and "/docs" in message
    if code == "method_not_allowed":
        assert "POST is not allowed on /v1/models; use GET" in message
    _ok_after(client)


def test_an_unexpected_failure_is_a_plain_json_500_and_the_server_goes_on(tiny_bundle, runtime, caplog):
    from fastapi.testclient import TestClient

    class FailingOnce:
        failed = False

        def __getattr__(self, name):
            return getattr(runtime, name)

        def embed(self, images):
            if not FailingOnce.failed:
                FailingOnce.failed = True
                raise RuntimeError("secret detail at /opt/internal.py line 3")
            return runtime.embed(images)

    with TestClient(make_app(tiny_bundle, FailingOnce(), max_wait_ms=0), raise_server_exceptions=False) as client:
        while client.get("/readyz").status_code != 200:
            pass
        r = client.post("/v1/features", content=encode(noise(64, 64, seed=7)), headers=RAW)
        assert r.status_code == 500 and r.json()["error"]["code"] == "internal_error"
        assert "secret" not in r.text and "Traceback" not in r.text
        assert "secret detail" in caplog.text  # logged on the server
        _ok_after(client)


def test_upload_over_the_byte_limit_is_413(tiny_bundle, runtime):
    with started_client(make_app(tiny_bundle, runtime, max_upload_bytes=20_000)) as client:
        big = encode(noise(128, 128))
        assert len(big) > 20_000
        for kwargs in (dict(content=big, headers=RAW), dict(files={"image": ("big.png", big)})):
            r = client.post("/v1/features", **kwargs)
            assert r.status_code == 413 and r.json()["error"]["code"] == "payload_too_large"
        # a streamed body without Content-Length is cut off too
        r = client.post("/v1/features", content=iter([big[:15_000], big[15_000:]]), headers=RAW)
        assert r.status_code == 413
        _ok_after(client)


def test_page_and_cors(tiny_bundle, runtime, client):
    page = client.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert client.get("/static/app.js").status_code == 200
    assert "access-control-allow-origin" not in client.get("/healthz", headers={"Origin": "http://x.example"}).headers
    with started_client(make_app(tiny_bundle, runtime, cors_origins="http://x.example")) as cors:
        r = cors.post("/v1/features", content=encode(noise(64, 64)), headers={**RAW, "Origin": "http://x.example"})
        assert r.headers["access-control-allow-origin"] == "http://x.example"
        assert "X-Feature-Id" in r.headers["access-control-expose-headers"]
