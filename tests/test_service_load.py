"""Batching, back-pressure, timeouts and disconnects, with the real tiny bundle.

In-process tests drive the app with httpx.AsyncClient over ASGI (concurrent requests in one event
loop); the disconnect test needs a real socket, so it runs one uvicorn on 127.0.0.1.
"""

from __future__ import annotations

import asyncio
import socket
import time

import httpx
import pytest
from live_server import live_server
from service_helpers import encode, make_app, metric, noise, run_async

RAW = {"content-type": "image/png"}


@pytest.fixture(scope="module")
def runtime(tiny_bundle):
    from lift_serve.service.ort_runtime import BundleRuntime

    return BundleRuntime(tiny_bundle, providers="cpu")


def _images(n: int, seed: int) -> list[bytes]:
    return [encode(noise(64, 64, seed=seed + i)) for i in range(n)]


def _post(client, data: bytes):
    return client.post("/v1/features", content=data, headers=RAW)


@pytest.mark.parametrize("batching", [True, False])
def test_concurrent_requests_form_batches_unless_batching_is_off(tiny_bundle, runtime, batching):
    app = make_app(tiny_bundle, runtime, max_batch_size=8, max_wait_ms=400, batching=batching)
    images = _images(6, seed=100 if batching else 200)

    async def scenario(client):
        responses = await asyncio.gather(*(_post(client, data) for data in images))
        return [r.status_code for r in responses], (await client.get("/metrics")).text

    statuses, text = asyncio.run(run_async(app, scenario))
    assert statuses == [200] * 6
    batcher = app.state.service.features.batcher
    assert batcher.images_run == 6
    assert metric(text, "lift_batch_size_count") == batcher.batches_run
    assert metric(text, "lift_batch_size_sum") == 6
    if batching:
        assert batcher.batches_run < 6  # 6 requests arriving within 400 ms: batches larger than 1 formed
    else:
        assert batcher.batches_run == 6


def test_queue_overflow_answers_429_with_retry_after(tiny_bundle, runtime):
    app = make_app(tiny_bundle, runtime, max_batch_size=8, max_wait_ms=1000, max_queue=2)
    images = _images(3, seed=300)

    async def scenario(client):
        responses = await asyncio.gather(*(_post(client, data) for data in images))
        after = await _post(client, encode(noise(64, 64, seed=399)))
        return responses, after, (await client.get("/metrics")).text

    responses, after, text = asyncio.run(run_async(app, scenario))
    assert sorted(r.status_code for r in responses) == [200, 200, 429]
    refused = next(r for r in responses if r.status_code == 429)
    assert refused.json()["error"]["code"] == "queue_full"
    assert int(refused.headers["retry-after"]) >= 1
    assert after.status_code == 200
    assert metric(text, 'lift_rejected_total{reason="queue_full"}') == 1


class _SlowRuntime:
    """The real runtime, 30 ms slower per batch (so that a queue can fill up)."""

    def __init__(self, runtime):
        self._runtime = runtime

    def __getattr__(self, name):
        return getattr(self._runtime, name)

    def embed(self, images):  # the backbone pass: what every new image costs
        time.sleep(0.03)
        return self._runtime.embed(images)

    def run(self, images, iterations=None):
        return self._runtime.upsample(images, self.embed(images), iterations)


def test_one_request_with_more_images_than_the_queue_holds_is_served(tiny_bundle, runtime):
    app = make_app(tiny_bundle, _SlowRuntime(runtime), max_batch_size=2, max_wait_ms=20, max_queue=2)
    files = [("image", (f"{i}.png", data)) for i, data in enumerate(_images(10, seed=500))]

    async def scenario(client):
        return await client.post("/v1/features", files=files)

    r = asyncio.run(run_async(app, scenario))
    assert r.status_code == 200, r.text
    assert r.headers["x-feature-shape"] == "10,32,8,8"


def test_request_timeout_is_504(tiny_bundle, runtime):
    app = make_app(tiny_bundle, runtime, max_batch_size=8, max_wait_ms=1000, request_timeout_s=0.1)

    async def scenario(client):
        return await _post(client, encode(noise(64, 64, seed=400)))

    r = asyncio.run(run_async(app, scenario))
    assert r.status_code == 504 and r.json()["error"]["code"] == "timeout"


def test_a_disconnected_clients_request_is_not_run(tiny_bundle, runtime):
    # The lone request waits max_wait_ms for company; the client hangs up meanwhile.
    app = make_app(tiny_bundle, runtime, max_batch_size=8, max_wait_ms=1000)
    body = encode(noise(64, 64, seed=500))
    with live_server(app) as url:
        host, port = url.removeprefix("http://").split(":")
        with socket.create_connection((host, int(port)), timeout=5) as sock:
            head = (f"POST /v1/features HTTP/1.1\r\nHost: {host}\r\nContent-Type: image/png\r\n"
                    f"Content-Length: {len(body)}\r\n\r\n").encode()
            sock.sendall(head + body)
            # hang up once the request is queued (it then waits max_wait_ms for company)
            deadline = time.monotonic() + 10
            while metric(httpx.get(url + "/metrics").text, "lift_queue_depth") < 1:
                assert time.monotonic() < deadline, "the request never reached the queue"
                time.sleep(0.02)
        deadline = time.monotonic() + 10
        while metric(httpx.get(url + "/metrics").text, 'lift_dropped_total{reason="disconnected"}') < 1:
            assert time.monotonic() < deadline, "the abandoned request was not dropped"
            time.sleep(0.05)
        text = httpx.get(url + "/metrics").text
        assert metric(text, "lift_images_total") == 0  # nothing reached the model
        # a client that stays gets its answer
        r = httpx.post(url + "/v1/features", content=body, headers=RAW, timeout=10)
        assert r.status_code == 200
        assert metric(httpx.get(url + "/metrics").text, "lift_images_total") == 1
