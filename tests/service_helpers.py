"""Images and app builders shared by the service tests (the tiny bundle's sizes are 64x64 and 64x96)."""

from __future__ import annotations

import contextlib
import io
import struct
import time
import zlib

import numpy as np
from PIL import Image


def encode(pixels: np.ndarray | Image.Image, fmt: str = "PNG", **kwargs) -> bytes:
    image = Image.fromarray(pixels) if isinstance(pixels, np.ndarray) else pixels
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()


def noise(height: int, width: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def blocks(height: int, width: int, block: int = 8, seed: int = 1) -> np.ndarray:
    """A texture of ``block``-pixel squares of random colours, ``[height, width, 3]`` uint8."""
    cells = np.random.default_rng(seed).integers(0, 256, (height // block, width // block, 3), dtype=np.uint8)
    return np.kron(cells, np.ones((block, block, 1), np.uint8))


def png_declaring(width: int, height: int) -> bytes:
    """A tiny PNG whose header claims ``width x height`` (a decompression bomb's header)."""
    data = bytearray(encode(np.zeros((1, 1, 3), np.uint8)))
    data[16:24] = struct.pack(">II", width, height)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])) & 0xFFFFFFFF)
    return bytes(data)


def make_app(bundle, runtime, **settings):
    from lift_serve.service.app import create_app
    from lift_serve.service.settings import Settings

    return create_app(Settings(bundle=bundle, **settings), runtime=runtime)


@contextlib.contextmanager
def started_client(app, timeout_s: float = 20.0):
    """A started TestClient that has seen ``/readyz`` answer 200."""
    from fastapi.testclient import TestClient

    with TestClient(app) as client:
        deadline = time.monotonic() + timeout_s
        while client.get("/readyz").status_code != 200:
            assert time.monotonic() < deadline, "the app did not become ready"
            time.sleep(0.01)
        yield client


async def run_async(app, scenario):
    """Run ``await scenario(client)`` with an httpx.AsyncClient on ``app`` inside its lifespan."""
    import asyncio

    import httpx

    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://testserver", timeout=30) as client:
            while (await client.get("/readyz")).status_code != 200:
                await asyncio.sleep(0.01)
            return await scenario(client)


def metric(text: str, name: str) -> float:
    """The value of one sample line ``name`` (with its labels) in Prometheus text, 0 if absent."""
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[-1])
    return 0.0
