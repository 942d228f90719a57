"""A real uvicorn server on 127.0.0.1 in a background thread, for tests that need a live socket.

The socket is bound to port 0 before uvicorn starts (no free-port race); the context manager waits
until ``GET /readyz`` answers 200 and always stops the server and joins its thread.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Iterator

import httpx


@contextlib.contextmanager
def live_server(app, ready_path: str = "/readyz", timeout_s: float = 30.0, **uvicorn_options) -> Iterator[str]:
    """Serve ``app`` (an ASGI app) on 127.0.0.1:<free port>; yields its base URL. ``uvicorn_options``
    go to ``uvicorn.Config`` (e.g. ``Settings().uvicorn_options()``, as ``lift serve`` passes them)."""
    import uvicorn

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    options = {"timeout_graceful_shutdown": 2, **uvicorn_options}
    config = uvicorn.Config(app, log_level="warning", lifespan="on", **options)
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            if not thread.is_alive():
                raise RuntimeError("the test server exited during startup (see the log above)")
            try:
                if httpx.get(url + ready_path, timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"the test server was not ready within {timeout_s} s")
            time.sleep(0.05)
        yield url
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        sock.close()
