"""Hostile inputs and strangers: formats that run programs, odd EXIF, lenient parameters, Host-based
redirects, and optional API keys. Each case here was answered wrongly before (500, a redirect to
the attacker's host, an external program started, a silently re-read parameter)."""

from __future__ import annotations

import io
import os
import stat

import numpy as np
import pytest
from lift_serve.service.codec import ImageError, decode_image, read_header
from PIL import Image
from service_helpers import blocks, encode, make_app, noise, started_client

ROOT_DIR = __import__("pathlib").Path(__file__).resolve().parents[1]




# -- formats ----------------------------------------------------------------------------------------
EPS = (b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 16 16\n%%EndComments\n"
       b"newpath 0 0 moveto 16 16 lineto stroke\nshowpage\n%%EOF\n")


def test_postscript_never_starts_a_program(tmp_path, monkeypatch):
    marker = tmp_path / "gs-ran"
    fake = tmp_path / "bin" / "gs"
    fake.parent.mkdir()
    fake.write_text(f"#!/bin/sh\ntouch {marker}\nexit 1\n")
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{fake.parent}{os.pathsep}{os.environ['PATH']}")
    for call in (read_header, decode_image):
        with pytest.raises(ImageError) as info:
            call(EPS, max_pixels=10_000)
        assert (info.value.status, info.value.code) == (415, "not_an_image")
        assert "JPEG, PNG, WebP, TIFF, BMP, GIF or PPM" in info.value.message
    assert not marker.exists(), "Pillow started the fake Ghostscript"


def test_formats_outside_the_allowlist_are_415_naming_the_accepted_ones():
    buffer = io.BytesIO()
    Image.new("F", (8, 8)).save(buffer, format="SPIDER")  # a valid file of a format Pillow reads
    with pytest.raises(ImageError) as info:
        decode_image(buffer.getvalue(), max_pixels=10_000)
    assert info.value.status == 415 and "PPM" in info.value.message


def test_every_allowed_format_decodes():
    pixels = blocks(16, 24, seed=3)
    for fmt in ("JPEG", "PNG", "WEBP", "TIFF", "BMP", "GIF", "PPM"):
        image = decode_image(encode(pixels, fmt), max_pixels=10_000)
        assert image.size == (24, 16) and image.mode == "RGB", fmt


def exif_orientation(field_type: int, value: bytes) -> bytes:
    """A little-endian EXIF block whose one entry is Orientation (0x0112) of ``field_type``
    (3 = SHORT as the standard says, 2 = ASCII as some cameras write it) holding ``value``."""
    import struct

    count = len(value) // 2 if field_type == 3 else len(value)
    entry = struct.pack("<HHI", 0x0112, field_type, count) + value.ljust(4, b"\x00")
    return b"Exif\x00\x00" + b"II*\x00" + struct.pack("<I", 8) + struct.pack("<H", 1) + entry + b"\x00" * 4


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
@pytest.mark.parametrize("field_type, value", [(3, b"\x06\x00"), (2, b"6\x00"), (2, b"6")])
def test_exif_orientation_however_stored_gives_consistent_size_and_pixels(fmt, field_type, value):
    pixels = blocks(16, 24, seed=4)  # 24 wide, 16 tall
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format=fmt, exif=exif_orientation(field_type, value), quality=100)
    data = buffer.getvalue()
    header = read_header(data, max_pixels=10_000)
    image = decode_image(data, max_pixels=10_000)
    assert (header.width, header.height) == image.size == (16, 24)  # orientation 6: rotated a quarter turn
    expected = np.rot90(pixels, k=-1)
    if fmt == "PNG":
        np.testing.assert_array_equal(np.asarray(image), expected)
    else:  # lossy, but the rotation is unmistakable on 8 px blocks
        assert np.abs(np.asarray(image).astype(int) - expected).mean() < 8


def test_exif_orientation_over_http_is_not_a_500(client):
    buffer = io.BytesIO()
    Image.fromarray(blocks(64, 96, seed=5)).save(buffer, format="JPEG", exif=exif_orientation(2, b"6\x00"))
    r = client.post("/v1/features", content=buffer.getvalue(), headers={"content-type": "image/png"})
    assert r.status_code == 200 and r.headers["x-image-size"] == "64x96"


# -- parameters -------------------------------------------------------------------------------------
@pytest.mark.parametrize("query, name", [
    ("x=1_0&y=5", "x"), ("x=%205%20&y=5", "x"), ("x=nan&y=5", "x"), ("x=5&y=inf", "y"), ("x=5&y=1e999", "y"),
    ("x=5&y=5&iterations=1.0", "iterations"), ("x=5&y=5&iterations=+1", "iterations"),
    ("x=5&y=5&alpha=0x1", "alpha"),
])
def test_numbers_are_read_strictly(client, query, name):
    data = encode(blocks(64, 64, seed=6))
    r = client.post(f"/v1/similarity?{query}", files={"image": ("a.png", data)})
    assert r.status_code == 422, r.text
    assert r.json()["error"]["code"] == "invalid_parameter" and name in r.json()["error"]["message"]


def test_integer_parameters_refuse_floats(client):
    data = encode(blocks(64, 64, seed=7))
    r = client.post("/v1/match?max_matches=1.0", files={"image_a": ("a.png", data), "image_b": ("b.png", data)})
    assert r.status_code == 422 and "max_matches" in r.json()["error"]["message"]
    r = client.post("/v1/match?max_matches=10", files={"image_a": ("a.png", data), "image_b": ("b.png", data)})
    assert r.status_code == 200


def test_a_feature_id_in_both_query_and_form_is_a_conflict(client):
    data = encode(blocks(64, 64, seed=8))
    fid = client.post("/v1/features", files={"image": ("a.png", data)}).headers["x-feature-id"]
    r = client.post(f"/v1/similarity?x=5&y=5&feature_id={fid}", data={"feature_id": fid})
    assert r.status_code == 422
    message = r.json()["error"]["message"]
    assert "feature_id" in message and "query" in message and "form" in message


# -- redirects --------------------------------------------------------------------------------------
def test_no_redirect_follows_the_host_header(client):
    r = client.get("/v1/models/", headers={"host": "evil.example"}, follow_redirects=False)
    assert r.status_code == 404 and "location" not in r.headers
    assert "evil.example" not in r.text


# -- API keys ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def keyed(tiny_bundle, runtime, tmp_path_factory):
    keys_file = tmp_path_factory.mktemp("keys") / "keys.txt"
    keys_file.write_text("# team keys\nfile-key-123\n\n")
    with started_client(make_app(tiny_bundle, runtime, max_wait_ms=0, api_keys="env-key-456, other",
                                 api_keys_file=keys_file)) as c:
        yield c


def test_without_a_key_the_api_is_401_and_health_stays_open(keyed):
    for method, path in (("get", "/v1/models"), ("post", "/v1/features"), ("get", "/metrics"),
                         ("post", "/v1/similarity?x=1&y=1")):
        r = getattr(keyed, method)(path)
        assert r.status_code == 401, path
        assert r.headers["www-authenticate"].startswith("Bearer")
        assert r.json()["error"]["code"] == "unauthorized" and "Authorization: Bearer" in r.json()["error"]["message"]
    for path in ("/healthz", "/readyz", "/", "/docs", "/openapi.json", "/docs/assets/swagger-ui.css"):
        assert keyed.get(path).status_code == 200, path


def test_a_wrong_key_is_401_and_never_echoed(keyed, caplog):
    for header in ("Bearer wrong-key-789", "Basic file-key-123", "Bearer", "file-key-123"):
        r = keyed.get("/v1/models", headers={"authorization": header})
        assert r.status_code == 401, header
        assert "wrong-key-789" not in r.text and "file-key-123" not in r.text
    assert "wrong-key-789" not in caplog.text and "file-key-123" not in caplog.text


def test_keys_from_the_setting_and_the_file_are_accepted(keyed):
    data = encode(blocks(64, 64, seed=9))
    for key in ("env-key-456", "other", "file-key-123"):
        auth = {"authorization": f"Bearer {key}"}
        assert keyed.get("/v1/models", headers=auth).status_code == 200
        assert keyed.post("/v1/features", files={"image": ("a.png", data)}, headers=auth).status_code == 200


def test_the_client_sends_its_key(tiny_bundle, runtime, monkeypatch):
    from lift_serve.client import LiftAPIError, LiftClient
    from live_server import live_server

    with live_server(make_app(tiny_bundle, runtime, max_wait_ms=0, api_keys="client-key")) as url:
        image = blocks(64, 64, seed=10)
        with LiftClient(url, api_key="client-key", retries=0) as client:
            assert client.features(image).shape == (32, 8, 8)
        monkeypatch.setenv("LIFT_API_KEY", "client-key")  # the default when api_key is not given
        with LiftClient(url, retries=0) as client:
            assert client.models()["model"]["channels"] == 32
        monkeypatch.delenv("LIFT_API_KEY")
        with LiftClient(url, retries=0) as client, pytest.raises(LiftAPIError) as info:
            client.models()
        assert (info.value.status, info.value.code) == (401, "unauthorized")


def test_an_unreadable_keys_file_stops_startup_with_a_message(tiny_bundle, tmp_path, capsys):
    from lift_serve import cli as lift_cli

    env_before = dict(os.environ)
    try:
        os.environ["LIFT_API_KEYS_FILE"] = str(tmp_path / "missing-keys.txt")
        assert lift_cli.main(["serve", "--bundle", str(tiny_bundle)]) == 2
    finally:
        os.environ.clear()
        os.environ.update(env_before)
    err = capsys.readouterr().err
    assert "LIFT_API_KEYS_FILE" in err and "cannot be read" in err and "Traceback" not in err


def test_numbers_as_clients_write_them_are_accepted(client):
    data = encode(blocks(64, 64, seed=11))
    fid = client.post("/v1/features", files={"image": ("a.png", data)}).headers["x-feature-id"]
    for query in ("x=5&y=5", "x=5.&y=.5", "x=0.999901533126831&y=1e-05", "x=-0&y=3.5E%2B1", "x=12&y=7&alpha=1"):
        r = client.post(f"/v1/similarity?{query}&format=npy", data={"feature_id": fid})
        assert r.status_code in (200, 422), query
        assert r.status_code == 200 or r.json()["error"]["code"] == "point_outside_image", (query, r.text)


# -- tampered bundles -------------------------------------------------------------------------------
@pytest.fixture
def bundle_copy(tiny_bundle, tmp_path):
    import shutil

    return shutil.copytree(tiny_bundle, tmp_path / "bundle")


def _rewrite(bundle, change=None, text=None):
    import json

    path = bundle / "manifest.json"
    if text is None:
        data = json.loads(path.read_text())
        change(data)
        text = json.dumps(data)
    path.write_text(text)


@pytest.mark.parametrize("change, field", [
    (lambda m: m["backbone"].update(patch_size=0), "backbone.patch_size"),
    (lambda m: m["input"].update(multiple=0), "input.multiple"),
    (lambda m: m.update(iterations=[-1, 0, 1]), "iterations"),
    (lambda m: m.update(default_iterations=-3), "default_iterations"),
    (lambda m: m["input"].update(sizes=[[16, 65536]]), "input.sizes"),
    (lambda m: m["input"].update(sizes=[[64, 64]] * 10_000), "input.sizes"),
    (lambda m: m["upsampler"].update(max_steps=10**9), "upsampler.max_steps"),
    (lambda m: m["output"].update(channels=2**40), "output.channels"),
])
def test_out_of_range_numbers_are_refused_by_name(bundle_copy, change, field):
    from lift_serve.bundle import BundleError, read_manifest

    _rewrite(bundle_copy, change)
    with pytest.raises(BundleError, match=f"field '{field}"):
        read_manifest(bundle_copy)


@pytest.mark.parametrize("text", [
    '{"format_version": 2, "input": {"mean": [NaN, 0.5, 0.5]}}',
    '{"format_version": 2, "backbone": {"seed": ' + "9" * 5000 + "}}",
    '{"format_version": 2, "created": ' + "[" * 200_000 + "]" * 200_000 + "}",
    '{"format_version": 1, "lift": 7, "input": {"sizes": "x"}}',
    "[" * 200_000 + "]" * 200_000,
])
def test_hostile_manifests_are_a_bundle_error_not_a_traceback(bundle_copy, text):
    from lift_serve.bundle import BundleError, read_manifest

    _rewrite(bundle_copy, text=text)
    with pytest.raises(BundleError):
        read_manifest(bundle_copy)


def test_a_manifest_beyond_the_size_cap_is_refused_unread(bundle_copy):
    from lift_serve.bundle import BundleError, read_manifest
    from lift_serve.bundle.manifest import MAX_MANIFEST_BYTES

    _rewrite(bundle_copy, text=" " * (MAX_MANIFEST_BYTES + 1))
    with pytest.raises(BundleError, match="more than a manifest can be"):
        read_manifest(bundle_copy)


def test_a_graph_linked_from_outside_the_bundle_is_refused(bundle_copy, tmp_path):
    from lift_serve.bundle import BundleError
    from lift_serve.service.ort_runtime import BundleRuntime

    outside = tmp_path / "elsewhere.onnx"
    (bundle_copy / "backbone.onnx").rename(outside)
    (bundle_copy / "backbone.onnx").symlink_to(outside)
    with pytest.raises(BundleError, match="is a link"):
        BundleRuntime(bundle_copy, providers=["cpu"], warmup=False)


def test_a_failed_load_tells_clients_nothing_about_paths(bundle_copy, caplog):
    from fastapi.testclient import TestClient
    from lift_serve.service.app import create_app
    from lift_serve.service.settings import Settings

    (bundle_copy / "upsampler_step.onnx").write_bytes(b"not a graph")
    app = create_app(Settings(bundle=bundle_copy, providers="cpu"))
    app.state.service.on_load_failure = lambda: None
    with TestClient(app) as c:
        import time

        for _ in range(200):
            r = c.get("/readyz")
            if r.json()["error"]["code"] == "model_load_failed":
                break
            time.sleep(0.05)
        assert r.status_code == 503 and r.headers["retry-after"]
        assert str(bundle_copy) not in r.text and "sha256" not in r.text
        assert str(bundle_copy) in caplog.text  # the operator still learns which file


def test_export_job_ignores_a_record_of_another_shape(tmp_path):
    import importlib.util
    import json

    spec = importlib.util.spec_from_file_location("export_job", ROOT_DIR / "docker" / "export_job.py")
    job = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(job)
    bundle = tmp_path / "model"
    bundle.mkdir()
    (bundle / "manifest.json").write_text("{}")
    for record in ("[]", "7", '"text"', "null"):
        job.record_path(bundle).write_text(record)
        assert job.is_current(bundle, {"a": 1}) is False
    job.record_path(bundle).write_text(json.dumps({"request": {"a": 1}, "manifest_sha256": "0"}))
    assert job.is_current(bundle, {"a": 1}) is False


def test_healthcheck_never_uses_a_proxy():
    """A ready service on 127.0.0.1 is healthy even when HTTP_PROXY points at nothing."""
    import http.server
    import subprocess
    import sys
    import threading

    class Ready(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 - the stdlib's name
            self.send_response(200 if self.path == "/readyz" else 404)
            self.end_headers()

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Ready)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        env = {"PATH": os.environ["PATH"], "LIFT_PORT": str(server.server_address[1]),
               "HTTP_PROXY": "http://127.0.0.1:9", "http_proxy": "http://127.0.0.1:9"}
        done = subprocess.run([sys.executable, str(ROOT_DIR / "docker" / "healthcheck.py")], env=env,
                              capture_output=True, text=True, timeout=30)
    finally:
        server.shutdown()
    assert done.returncode == 0, done.stderr


# -- bounded answers --------------------------------------------------------------------------------
def test_images_per_request_and_answer_size_are_capped(tiny_bundle, runtime):
    data = encode(blocks(64, 64, seed=12))
    app = make_app(tiny_bundle, runtime, max_wait_ms=0, max_images_per_request=3, max_response_bytes=20_000)
    with started_client(app) as c:
        for count in (4, 40):
            r = c.post("/v1/features", files=[("image", (f"{i}.png", data)) for i in range(count)])
            assert r.status_code == 413 and r.json()["error"]["code"] == "too_many_images", count
        # one image at density 1 is 32 x 8 x 8 float32 = 8,192 bytes; three are 24,576 > 20,000
        r = c.post("/v1/features", files=[("image", (f"{i}.png", data)) for i in range(3)])
        assert r.status_code == 422 and r.json()["error"]["code"] == "response_too_large"
        assert "LIFT_MAX_RESPONSE_BYTES=20000" in r.json()["error"]["message"]
        r = c.post("/v1/features?dtype=float16", files=[("image", (f"{i}.png", data)) for i in range(3)])
        assert r.status_code == 200


def test_drawings_stay_small_whatever_the_aspect(client):
    from lift_serve.service.render import MAX_DRAWING_SIDE

    strip = encode(np.full((1, 100_000, 3), 90, np.uint8))
    square = encode(blocks(64, 64, seed=13))
    r = client.post("/v1/match?format=png", files={"image_a": ("a.png", strip), "image_b": ("b.png", square)})
    assert r.status_code == 200, r.text
    width, height = Image.open(io.BytesIO(r.content)).size
    assert width <= MAX_DRAWING_SIDE and height <= MAX_DRAWING_SIDE
    big = encode(np.full((4100, 4200, 3), 200, np.uint8))
    r = client.post("/v1/similarity?x=10&y=10&overlay=true", files={"image": ("big.png", big)})
    assert r.status_code == 200, r.text
    assert max(Image.open(io.BytesIO(r.content)).size) <= MAX_DRAWING_SIDE


# -- decoding that cannot starve the server ---------------------------------------------------------
def _jpeg_with_comments(count: int, payload: bytes) -> bytes:
    """A valid small JPEG with ``count`` comment segments holding ``payload`` each."""
    import struct

    data = encode(blocks(32, 32, seed=14), "JPEG")
    segment = b"\xff\xfe" + struct.pack(">H", len(payload) + 2) + payload
    return data[:2] + segment * count + data[2:]


def test_jpegs_with_too_many_scans_are_refused_before_decoding():
    """A real scan bomb (a progressive file whose first scan is repeated; libjpeg decodes each
    repeat): one scan over the limit is refused by the header check, at the limit it decodes."""
    from lift_serve.bench.decode_bench import progressive_jpeg_with_scans
    from lift_serve.service.codec import MAX_JPEG_SCANS

    pixels = blocks(48, 64, seed=14)
    assert decode_image(progressive_jpeg_with_scans(pixels, MAX_JPEG_SCANS), max_pixels=10_000).size == (64, 48)
    bomb = progressive_jpeg_with_scans(pixels, MAX_JPEG_SCANS + 1)
    with Image.open(io.BytesIO(bomb)) as image:  # libjpeg itself decodes it: it is a valid file
        image.load()
    for call in (read_header, decode_image):
        with pytest.raises(ImageError) as info:
            call(bomb, max_pixels=10_000)
        assert (info.value.status, info.value.code) == (413, "too_many_scans")
        assert str(MAX_JPEG_SCANS) in info.value.message


def test_jpeg_limits_walk_the_marker_structure():
    """Scan-marker bytes inside a comment (or an EXIF thumbnail) are not scans; millions of empty
    segments, which Pillow's header parser would walk in Python, are refused before it runs."""
    from lift_serve.service.codec import MAX_JPEG_SEGMENTS

    assert decode_image(_jpeg_with_comments(1, b"\xff\xda" * 2000), max_pixels=10_000).size == (32, 32)
    assert decode_image(_jpeg_with_comments(20, b"note"), max_pixels=10_000).size == (32, 32)
    with pytest.raises(ImageError) as info:
        read_header(_jpeg_with_comments(MAX_JPEG_SEGMENTS + 1, b""), max_pixels=10_000)
    assert (info.value.status, info.value.code) == (413, "too_many_segments")


def test_real_progressive_jpegs_pass_the_scan_limit():
    buffer = io.BytesIO()
    Image.fromarray(blocks(64, 64, seed=15)).save(buffer, format="JPEG", progressive=True, quality=90)
    assert 1 < buffer.getvalue().count(b"\xff\xda") <= 64
    assert decode_image(buffer.getvalue(), max_pixels=10_000).size == (64, 64)


def test_decode_gate_bounds_pixels_in_flight_and_concurrency():
    import asyncio

    from lift_serve.service.decode_gate import DecodeGate
    from lift_serve.service.errors import ServiceError

    async def scenario():
        gate = DecodeGate(concurrency=1, pixel_budget=1000, wait_s=0.05)
        async with gate.admit(600):
            with pytest.raises(ServiceError) as over_budget:
                async with gate.admit(600):
                    pass
            with pytest.raises(ServiceError) as no_slot:
                async with gate.admit(100):
                    pass
        assert gate.pixels_in_flight == 0
        async with gate.admit(1000):  # free again once the first left
            pass
        return over_budget.value, no_slot.value

    over_budget, no_slot = asyncio.run(scenario())
    for error in (over_budget, no_slot):
        assert (error.status, error.code) == (503, "decode_busy") and error.headers["Retry-After"]
    assert "LIFT_DECODE_PIXEL_BUDGET=1000" in over_budget.message


# -- server limits ----------------------------------------------------------------------------------
def test_server_limits_refuse_huge_heads_and_cap_connections(tiny_bundle, runtime):
    """With the limits `lift serve` passes to uvicorn: a 1 MB request head is not accepted, and
    connections beyond LIFT_MAX_CONNECTIONS get 503 instead of using up file descriptors."""
    import socket

    import httpx
    from lift_serve.service.settings import Settings
    from live_server import live_server

    settings = Settings(bundle=tiny_bundle, max_header_bytes=16384, max_connections=4, keep_alive_s=1.0)
    app = make_app(tiny_bundle, runtime, max_wait_ms=0)
    with live_server(app, **settings.uvicorn_options()) as url:
        host, port = url.removeprefix("http://").split(":")
        with socket.create_connection((host, int(port)), timeout=5) as conn:
            conn.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 1_000_000 + b"\r\n\r\n")
            try:
                answer = conn.recv(200)
            except (ConnectionResetError, BrokenPipeError):
                answer = b""
        assert not answer.startswith(b"HTTP/1.1 200"), answer
        # half-sent requests hold connections; the ones past the limit are answered 503 at once
        idle = [socket.create_connection((host, int(port)), timeout=5) for _ in range(4)]
        try:
            for conn in idle:
                conn.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")  # no blank line: never completes
            statuses = [httpx.get(url + "/healthz", timeout=5).status_code for _ in range(3)]
        finally:
            for conn in idle:
                conn.close()
        assert 503 in statuses, statuses
        assert httpx.get(url + "/healthz", timeout=5).status_code == 200  # and served again once they left


def test_half_sent_request_heads_are_closed_after_the_head_timeout(tiny_bundle, runtime):
    import socket
    import time

    import httpx
    from lift_serve.service.settings import Settings
    from live_server import live_server

    from lift_serve.http_server import server_options

    settings = Settings(bundle=tiny_bundle, head_timeout_s=0.5, keep_alive_s=30.0)
    with live_server(make_app(tiny_bundle, runtime, max_wait_ms=0), **server_options(settings)) as url:
        host, port = url.removeprefix("http://").split(":")
        with socket.create_connection((host, int(port)), timeout=5) as slow:
            slow.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Slow: ")  # and then nothing more
            started = time.monotonic()
            assert slow.recv(100) == b""  # the server closed it
            assert 0.4 <= time.monotonic() - started < 4
        # a request that completes its head in time is served, also a second one on a kept-alive connection
        with httpx.Client(base_url=url) as http:
            assert http.get("/healthz").status_code == 200
            time.sleep(0.2)
            assert http.get("/healthz").status_code == 200


def test_a_body_sent_too_slowly_is_closed_after_the_body_timeout(tiny_bundle, runtime):
    import socket
    import time

    import httpx
    from lift_serve.service.settings import Settings
    from live_server import live_server

    from lift_serve.http_server import server_options

    settings = Settings(bundle=tiny_bundle, head_timeout_s=5.0, body_timeout_s=0.6, keep_alive_s=30.0)
    with live_server(make_app(tiny_bundle, runtime, max_wait_ms=0), **server_options(settings)) as url:
        host, port = url.removeprefix("http://").split(":")
        with socket.create_connection((host, int(port)), timeout=5) as slow:
            slow.sendall(b"POST /v1/features HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; boundary=b\r\n"
                         b"Content-Length: 100000\r\n\r\n--b\r\n")
            started = time.monotonic()
            slow.settimeout(0.1)
            answer, closed = b"", False
            while not closed and time.monotonic() - started < 4:  # a trickle of body bytes: a deadline, not idleness
                try:
                    chunk = slow.recv(4096)
                    answer, closed = answer + chunk, not chunk
                except TimeoutError:
                    try:
                        slow.sendall(b"x")
                    except OSError:
                        closed = True
            elapsed = time.monotonic() - started
            assert answer == b"" and 0.5 <= elapsed < 4, (answer[:200], elapsed)
        # a whole body sent at once is served on a new connection
        image = encode(blocks(32, 32, seed=16))
        r = httpx.post(url + "/v1/features", files={"image": ("a.png", image)}, timeout=30)
        assert r.status_code == 200, r.text


def test_a_request_head_over_the_limit_is_431_whatever_the_reads(tiny_bundle, runtime):
    """The head limit is exact: one byte over is refused with the JSON error, also a head between
    one and two times the limit (which uvicorn's own check lets through when it comes in two reads)."""
    import json
    import socket

    import httpx
    from lift_serve.service.settings import Settings
    from live_server import live_server

    from lift_serve.http_server import server_options

    settings = Settings(bundle=tiny_bundle, max_header_bytes=4096)
    with live_server(make_app(tiny_bundle, runtime, max_wait_ms=0), **server_options(settings)) as url:
        host, port = url.removeprefix("http://").split(":")
        prefix = b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Fill: "
        for size in (4097, 7000):
            head = prefix + b"a" * (size - len(prefix) - 4) + b"\r\n\r\n"
            assert len(head) == size
            with socket.create_connection((host, int(port)), timeout=5) as conn:
                conn.sendall(head[:3000])
                conn.sendall(head[3000:])
                answer = b""
                while chunk := conn.recv(4096):
                    answer += chunk
            status, _, rest = answer.partition(b"\r\n")
            assert status == b"HTTP/1.1 431 Request Header Fields Too Large", answer[:200]
            error = json.loads(rest.partition(b"\r\n\r\n")[2])["error"]
            assert error["code"] == "header_too_large" and "LIFT_MAX_HEADER_BYTES" in error["message"]
        exact = prefix + b"a" * (4096 - len(prefix) - 4) + b"\r\n\r\n"
        with socket.create_connection((host, int(port)), timeout=5) as conn:
            conn.sendall(exact)
            assert conn.recv(100).startswith(b"HTTP/1.1 200")
        with httpx.Client(base_url=url) as http:  # keep-alive: each request head is counted afresh
            assert [http.get("/healthz", headers={"x-fill": "b" * 3000}).status_code for _ in range(3)] == [200] * 3


def test_a_graph_that_needs_external_data_files_is_refused(bundle_copy):
    """External-data files are outside the manifest's sha256: a graph that refers to one does not load."""
    import json

    import onnx
    from lift_serve.bundle import BundleError, sha256_file
    from lift_serve.service.ort_runtime import BundleRuntime

    model = onnx.load(str(bundle_copy / "backbone.onnx"))
    onnx.save_model(model, str(bundle_copy / "backbone.onnx"), save_as_external_data=True, all_tensors_to_one_file=True,
                    location="weights.bin", size_threshold=0)
    assert (bundle_copy / "weights.bin").stat().st_size > 0
    manifest = json.loads((bundle_copy / "manifest.json").read_text())
    manifest["backbone"]["graph"]["sha256"] = sha256_file(bundle_copy / "backbone.onnx")
    (bundle_copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match="self-contained"):
        BundleRuntime(bundle_copy, providers=["cpu"], warmup=False)


def test_sigterm_ends_the_server_within_the_grace_period(tiny_bundle, tmp_path):
    """`lift serve` under SIGTERM (what `docker stop` sends) exits by itself, well within compose's
    30 s grace period, also while a client holds a half-sent request."""
    import signal
    import socket
    import subprocess
    import sys
    import time

    import httpx

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = {**os.environ, "LIFT_PROVIDERS": "cpu", "LIFT_GRACEFUL_SHUTDOWN_S": "5", "LIFT_LOG_LEVEL": "warning"}
    server = subprocess.Popen([sys.executable, "-m", "lift_serve.cli", "serve", "--bundle", str(tiny_bundle),
                               "--port", str(port)], env=env, cwd=tmp_path,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.2)
        else:
            raise AssertionError("lift serve did not become ready")
        holder = socket.create_connection(("127.0.0.1", port), timeout=5)
        holder.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
        started = time.monotonic()
        server.send_signal(signal.SIGTERM)
        code = server.wait(timeout=25)
        took = time.monotonic() - started
        holder.close()
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()
    # uvicorn shuts down gracefully, then re-raises the signal so the exit status says why (143 in a container)
    assert code in (0, -signal.SIGTERM) and took < 10, (code, took, server.stdout.read()[-2000:])


def test_16_bit_images_are_scaled_without_float_copies():
    """A 16-bit PNG becomes 8-bit RGB with round(v * 255 / 65535) for every value, and the NumPy
    memory of the conversion stays a few bytes a pixel (through float64 it was about 26)."""
    import tracemalloc

    side = 1024
    values = (np.arange(side * side, dtype=np.uint32) % 65536).astype(np.uint16).reshape(side, side)
    buffer = io.BytesIO()
    Image.fromarray(values).save(buffer, "PNG")
    tracemalloc.start()
    try:
        image = decode_image(buffer.getvalue(), max_pixels=side * side)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    expected = np.rint(values.astype(np.float64) * 255 / 65535).astype(np.uint8)
    assert np.array_equal(np.asarray(image)[..., 0], expected)
    assert peak / (side * side) < 8, peak / (side * side)


def test_a_valid_psd_is_415_naming_the_accepted_formats():
    """A real Photoshop file (Pillow itself reads it) is outside the allowlist: 415, not 'corrupt'."""
    import struct

    width, height = 4, 3
    header = b"8BPS" + struct.pack(">H6xHIIHH", 1, 3, height, width, 8, 3)  # RGB, 8 bits
    sections = struct.pack(">III", 0, 0, 0)  # no colour data, resources or layers
    data = header + sections + struct.pack(">H", 0) + bytes(range(3 * width * height))  # raw planes
    with Image.open(io.BytesIO(data)) as image:
        assert image.format == "PSD" and image.size == (width, height)
    with pytest.raises(ImageError) as info:
        decode_image(data, max_pixels=10_000)
    assert (info.value.status, info.value.code) == (415, "not_an_image") and "PPM" in info.value.message


def test_an_allocation_failure_while_decoding_is_413_not_corrupt(monkeypatch):
    data = encode(blocks(16, 16, seed=17))

    def out_of_memory(self):
        raise MemoryError

    monkeypatch.setattr(Image.Image, "load", out_of_memory)
    with pytest.raises(ImageError) as info:
        decode_image(data, max_pixels=10_000)
    assert (info.value.status, info.value.code) == (413, "image_too_large") and "memory" in info.value.message


def test_an_image_sent_with_curl_data_says_to_use_a_file_upload(client):
    """`curl -d @cat.jpg` sends the bytes as an url-encoded form: the answer says how to upload."""
    jpeg = encode(noise(32, 32, seed=3), "JPEG")
    r = client.post("/v1/features", content=jpeg, headers={"content-type": "application/x-www-form-urlencoded"})
    assert r.status_code == 422
    message = r.json()["error"]["message"]
    assert "curl -F image=@photo.jpg" in message and "--data-binary" in message
    assert "\xff" not in message and "ÿ" not in message  # the bytes are not echoed
