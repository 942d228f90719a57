"""Cache-affine routing, for real: two ``lift serve`` processes behind nginx running the scale
variant's own configuration (docker/nginx.conf), every process on 127.0.0.1.

A replica caches the features of the images it embedded, and a click sends only a feature id: the
balancer must send the click to that replica. docker/nginx.conf routes on the image's content digest
(``X-Lift-Route``, else the ``feature_id`` / ``feature_id_a`` query parameter) with a consistent
hash. Only what cannot run outside Docker is adapted: the replicas' names become the two local
ports, nginx 1.22 (Debian's) has no ``resolve``, and paths move into the test's folder.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from service_helpers import encode, noise

ROOT = Path(__file__).resolve().parent.parent
NGINX = shutil.which("nginx") or str(ROOT / ".cache/ci/nginx/usr/sbin/nginx")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for(url: str, timeout_s: float, process: subprocess.Popen) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{process.args[:4]} exited with {process.returncode}")
        with contextlib.suppress(httpx.TransportError):
            if httpx.get(url, timeout=2).status_code == 200:
                return
        time.sleep(0.1)
    raise RuntimeError(f"{url} did not answer 200 within {timeout_s} s")


@contextlib.contextmanager
def processes(*commands: tuple[list[str], dict[str, str]]):
    started = [subprocess.Popen(cmd, env={**os.environ, **env}, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
               for cmd, env in commands]
    try:
        yield started
    finally:
        for process in started:
            process.terminate()
        for process in started:
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def local_nginx_config(tmp_path: Path, replicas: list[int], port: int) -> Path:
    """docker/nginx.conf with the replicas on local ports, listening on ``port``, paths in ``tmp_path``."""
    text = (ROOT / "docker" / "nginx.conf").read_text()
    for index, replica in enumerate(replicas):
        text = text.replace(f"server api-{index}:8000 resolve ", f"server 127.0.0.1:{replica} ")
    assert "api-" not in re.sub(r"#.*", "", text), "a replica of docker/nginx.conf was left unmapped"
    text = text.replace("listen 8080;", f"listen 127.0.0.1:{port};").replace("pid /tmp/nginx.pid;",
                                                                          f"pid {tmp_path}/nginx.pid;")
    temp_paths = "".join(f"    {kind}_temp_path {tmp_path}/{kind};\n"
                         for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))
    text = text.replace("http {\n", "http {\n" + temp_paths, 1)
    text = text.replace("access_log /dev/stdout;", "access_log off;")
    path = tmp_path / "nginx.conf"
    path.write_text(text)
    return path


def ask(url: str, fid: str, headers: dict | None = None) -> int:
    """Status of an id-only click (the id in the query string)."""
    return httpx.post(f"{url}/v1/similarity", params={"feature_id": fid, "x": 4, "y": 4, "format": "npy"},
                      headers=headers, timeout=30).status_code


def test_two_replicas_behind_the_scale_routing_answer_every_click_from_the_replica_that_holds_it(
        tmp_path, tiny_bundle):
    from lift_serve.client import LiftClient

    assert os.access(NGINX, os.X_OK), "no nginx binary: docker/ci-check.sh unpacks Debian's into .cache/ci/nginx"
    ports = [free_port(), free_port()]
    lb_port = free_port()
    serve = [([sys.executable, "-m", "lift_serve.cli", "serve", "--bundle", str(tiny_bundle), "--host", "127.0.0.1",
               "--port", str(port), "--log-level", "warning"], {"LIFT_MAX_WAIT_MS": "0", "LIFT_PROVIDERS": "cpu"})
             for port in ports]
    conf = local_nginx_config(tmp_path, ports, lb_port)
    nginx = ([NGINX, "-p", str(tmp_path), "-c", str(conf), "-e", "/dev/stderr", "-g", "daemon off;"], {})
    with processes(*serve, nginx) as started:
        replicas = [f"http://127.0.0.1:{port}" for port in ports]
        for url, process in zip(replicas, started, strict=False):
            wait_for(url + "/readyz", 120, process)
        lb = f"http://127.0.0.1:{lb_port}"
        wait_for(lb + "/lb-health", 20, started[2])

        images = [encode(noise(64, 64, seed=100 + i), "JPEG") for i in range(16)]
        with LiftClient(lb, reuse_features=False) as client:
            ids = [client.extract(image).feature_id for image in images]
            holders = []
            for fid in ids:
                # Exactly one replica holds each image's features: the caches are per replica.
                statuses = [ask(url, fid) for url in replicas]
                assert sorted(statuses) == [200, 404], (fid, statuses)
                holders.append(statuses.index(200))
            assert set(holders) == {0, 1}, "the 16 uploads should land on both replicas"

            for fid in ids:
                assert ask(lb, fid) == 200  # id in the query string only: nginx reads it there
                assert ask(lb, fid, {"X-Lift-Route": fid[:32]}) == 200  # the header the client and page send
                # the client's own click by id (form field + header)
                sim = client.similarity(None, x=4, y=4, feature_id=fid, format="npy")
                assert sim.ndim == 2
            # /v1/match routes on feature_id_a: two ids of the same replica answer from its cache.
            first = [fid for fid, h in zip(ids, holders, strict=True) if h == holders[0]][:2]
            if len(first) == 2:
                r = httpx.post(f"{lb}/v1/match", params={"feature_id_a": first[0], "feature_id_b": first[1]},
                               timeout=30)
                assert r.status_code == 200, r.text
        hits = [float(re.search(r"^lift_cache_hits_total (\S+)", httpx.get(url + "/metrics").text, re.M).group(1))
                for url in replicas]
        assert sum(hits) >= 3 * len(ids)  # every click through the balancer was a cache hit on its holder


@pytest.mark.parametrize("value", ["", "not-a-digest", "0123456789abcdef0123456789abcdeg"])
def test_the_route_key_ignores_what_is_not_a_digest(value):
    from lift_serve.client.lift_client import route_key

    assert route_key(feature_id=value) is None if value else route_key() is None
    data = b"image bytes"
    import hashlib

    assert route_key(data) == hashlib.sha256(data).hexdigest()[:32]
    assert route_key(feature_id="0123456789abcdef0123456789abcdef-k1-sq-64x64") == "0123456789abcdef0123456789abcdef"
