"""The fuzzing suite: property-based tests of the codec and the geometry on any bytes and any size
(hypothesis), and the whole API generated from its own OpenAPI document (schemathesis), each with
a bounded number of examples so that the suite stays fast and deterministic (derandomised).

Assertions: decoding either works or raises the codec's own ImageError (never another exception);
geometry maps every point inside an image to a cell on the grid; the server never answers a 5xx
except its documented 503/504, never a traceback, and answers the next request.
"""

from __future__ import annotations

import io

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from lift_serve.service.codec import ImageError, decode_image, read_header
from lift_serve.service.geometry import ImageGeometry
from PIL import Image

FUZZ = settings(max_examples=150, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])


def _valid_image(fmt: str, width: int, height: int, seed: int) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format=fmt)
    return buffer.getvalue()


@FUZZ
@given(st.binary(max_size=4096))
def test_any_bytes_decode_or_raise_image_error(data):
    for call in (read_header, decode_image):
        try:
            call(data, max_pixels=1_000_000)
        except ImageError as exc:
            assert exc.status in (400, 413, 415) and exc.code and exc.message


@FUZZ
@given(st.sampled_from(["PNG", "JPEG", "GIF", "BMP", "TIFF", "WEBP"]), st.integers(1, 40), st.integers(1, 40),
       st.integers(0, 2**16), st.data())
def test_damaged_images_decode_or_raise_image_error(fmt, width, height, seed, data):
    valid = bytearray(_valid_image(fmt, width, height, seed))
    # flip, cut or insert bytes anywhere: the shapes of damage seen in the wild
    for _ in range(data.draw(st.integers(1, 4))):
        where = data.draw(st.integers(0, max(0, len(valid) - 1)))
        action = data.draw(st.sampled_from(["flip", "cut", "insert"]))
        if action == "flip" and valid:
            valid[where] ^= data.draw(st.integers(1, 255))
        elif action == "cut":
            del valid[where:]
        else:
            valid[where:where] = data.draw(st.binary(min_size=1, max_size=64))
    try:
        header = read_header(bytes(valid), max_pixels=1_000_000)
        image = decode_image(bytes(valid), max_pixels=1_000_000)
        assert image.mode == "RGB" and image.size == (header.width, header.height)
    except ImageError as exc:
        assert exc.status in (400, 413, 415)


@FUZZ
@given(st.integers(1, 5000), st.integers(1, 5000), st.sampled_from(["square", "keep_aspect"]),
       st.sampled_from([16.0, 8.0, 4.0]), st.floats(0, 1, exclude_max=True), st.floats(0, 1, exclude_max=True))
def test_every_point_of_an_image_maps_to_a_cell(width, height, policy, stride, fx, fy):
    geometry = ImageGeometry.plan(width, height, [(64, 64), (64, 96), (224, 224)], policy, stride)
    row, col = geometry.to_cell(fx * width, fy * height)
    assert 0 <= row < geometry.grid_height and 0 <= col < geometry.grid_width
    for outside in ((-0.5, 0.0), (width + 0.5, 0.0), (0.0, height + 1.0)):
        with pytest.raises(ValueError):
            geometry.to_cell(*outside)


# -- the API from its own schema --------------------------------------------------------------------
@pytest.fixture(scope="module")
def fuzzed_app(tiny_bundle):
    from lift_serve.service.app import create_app
    from lift_serve.service.ort_runtime import BundleRuntime
    from lift_serve.service.settings import Settings

    runtime = BundleRuntime(tiny_bundle, providers="cpu")
    return create_app(Settings(bundle=tiny_bundle, max_wait_ms=0), runtime=runtime)


def test_schema_driven_requests_never_break_the_server(fuzzed_app):
    """Every operation of /openapi.json with generated parameters and bodies (schemathesis, over
    ASGI in-process, the tiny bundle loaded): no undocumented 5xx, no traceback, and the server
    answers a good request afterwards."""
    import schemathesis
    from fastapi.testclient import TestClient

    documented = {503, 504}
    counts = {"cases": 0, "undocumented_5xx": 0, "statuses": {}}
    schema = schemathesis.openapi.from_asgi("/openapi.json", fuzzed_app)
    for operation in schema.get_all_operations():
        operation = operation.ok()

        @settings(max_examples=60, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
        @given(operation.as_strategy())
        def check(case):
            response = case.call()
            counts["cases"] += 1
            counts["statuses"][response.status_code] = counts["statuses"].get(response.status_code, 0) + 1
            bad = response.status_code >= 500 and response.status_code not in documented
            counts["undocumented_5xx"] += bad
            assert not bad, (case.method, case.path, response.status_code, response.content[:300])
            assert b"Traceback" not in response.content

        check()
    with TestClient(fuzzed_app) as client:
        from service_helpers import blocks, encode

        r = client.post("/v1/features", files={"image": ("a.png", encode(blocks(64, 64, seed=1)))})
        assert r.status_code == 200
    print(f"schemathesis: {counts}")
    assert counts["cases"] >= 150 and counts["undocumented_5xx"] == 0, counts
