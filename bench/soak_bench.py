"""`lift bench soak`: a bounded soak of `lift serve` under mixed good and hostile traffic.

What one run does, against ``lift serve`` started as a subprocess on 127.0.0.1 (service defaults):

1. **Idle latency**: each good request kind, one at a time on the idle server (median of
   ``--idle-requests``): an upload for features (a new image each time, so decode + backbone +
   upsampler), a click by feature id (``/v1/similarity`` npy, cached: a dot product), and a match
   by feature ids (cached).
2. **Soak**: ``--minutes`` of traffic from ``--clients`` clients (threads, one connection each,
   each stops by itself at the deadline): ``--hostile-clients`` of them send the hostile corpus
   below round-robin, the others good requests (the three kinds above in turn). Hostile requests:
   a scan-bomb JPEG (65 scans), a PNG declaring 10^10 pixels, a 16-bit PNG just under
   ``LIFT_MAX_PIXELS`` (it decodes: the memory-amplification case), a 1,000,000 x 1 strip matched
   with ``format=png``, an EPS file, a truncated JPEG, random bytes, a lenient parameter
   (``x=1_0``), an unknown feature id, more images than ``LIFT_MAX_IMAGES_PER_REQUEST``, a 100 KB
   header line, a request head left half-sent, and a body left half-sent (both held until the
   server closes them).
3. **Quiet**: ``--quiet-s`` without traffic, then the server's RSS again.

Reported: the server's RSS at start (ready and warmed by the idle phase), its peak during the soak
(sampled every 0.25 s) and after the quiet period; requests served by kind and status; the share of
good requests answered within 2x their idle latency, by kind; statuses a hostile request must not
get (any 5xx but the documented 503 and 504, or a refused connection) counted as ``unexpected``.
JSON goes to ``--out``; a table is printed. The clients run on the same machine as the server, so
on a small machine they compete with it for CPU: compare figures within one run.
"""

from __future__ import annotations

import argparse
import collections
import io
import random
import socket
import statistics
import struct
import threading
import time
import zlib
from pathlib import Path

from lift_serve.bench.measure import status_mb
from lift_serve.bench.report import machine_facts, write_report
from lift_serve.bench.serve_bench import BenchError, ServerProcess, percentile, synthetic_jpegs

HELP = "bounded soak: mixed good and hostile traffic from 16 clients; RSS, served, latency within 2x idle"
DEFAULT_OUT = "runs/bench_soak.json"
EXPECTED_HOSTILE_5XX = {503, 504}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--bundle", default=None, metavar="DIR",
                        help="bundle to serve (default: the demo bundle, exported once to --demo-dir)")
    parser.add_argument("--demo-dir", default=None, metavar="DIR", help="demo bundle cache (default: LIFT_DEMO_DIR)")
    parser.add_argument("--minutes", type=float, default=3.0, help="soak duration (default: %(default)s)")
    parser.add_argument("--clients", type=int, default=16, help="concurrent clients (default: %(default)s)")
    parser.add_argument("--hostile-clients", type=int, default=4,
                        help="of those, clients sending hostile requests (default: %(default)s)")
    parser.add_argument("--think-ms", type=float, default=1000.0,
                        help="pause of each good client between its requests, as a person clicking (default: "
                             "%(default)s); 0 = back to back, which measures a saturated server instead")
    parser.add_argument("--baseline-minutes", type=float, default=1.0,
                        help="good clients alone first, for comparison (default: %(default)s; 0 = skip)")
    parser.add_argument("--idle-requests", type=int, default=10, help="idle-latency requests per kind")
    parser.add_argument("--quiet-s", type=float, default=60.0, help="quiet period before the last RSS (default: 60)")
    parser.add_argument("--size", type=int, default=224, help="side of the good uploads (default: 224)")
    parser.add_argument("--server-env", action="append", default=[], metavar="LIFT_NAME=VALUE",
                        help="a setting for the server (repeatable), e.g. LIFT_MAX_PIXELS=1000000; the hostile "
                             "corpus is sized by the server's own limits")
    parser.add_argument("--out", default=DEFAULT_OUT, help="JSON results (default: %(default)s)")


# -- the hostile corpus --------------------------------------------------------------------------------
def _png_chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))


def _png_declaring(width: int, height: int) -> bytes:
    """A tiny PNG whose header declares ``width x height`` (8-bit gray), with almost no data."""
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", header)
            + _png_chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + _png_chunk(b"IEND", b""))


def _encode(pixels, fmt: str, **options) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, fmt, **options)
    return buffer.getvalue()


def hostile_requests(max_pixels: int, max_images: int) -> list[dict]:
    """Each entry: ``name`` and either ``raw`` (bytes sent on a socket as they are) or ``path``,
    ``params``, ``files`` / ``content``, ``headers`` for httpx."""
    import numpy as np
    from lift_serve.bench.decode_bench import progressive_jpeg_with_scans
    from lift_serve.service.codec import MAX_JPEG_SCANS

    rng = np.random.default_rng(7)
    photo = rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)
    side = int((max_pixels * 0.99) ** 0.5)
    gray16 = (np.arange(side * side, dtype=np.uint32) % 65536).astype(np.uint16).reshape(side, side)
    jpeg = _encode(photo, "JPEG")
    strip = _encode(np.full((1, 1_000_000, 3), 90, np.uint8), "PNG")
    return [
        {"name": "scan bomb JPEG", "path": "/v1/features",
         "files": [("image", ("bomb.jpg", progressive_jpeg_with_scans(photo, MAX_JPEG_SCANS + 1)))]},
        {"name": "PNG declaring 10^10 pixels", "path": "/v1/features",
         "files": [("image", ("huge.png", _png_declaring(100_000, 100_000)))]},
        {"name": "16-bit PNG just under LIFT_MAX_PIXELS", "path": "/v1/features",
         "files": [("image", ("gray16.png", _encode(gray16, "PNG")))]},
        {"name": "1,000,000 x 1 strip, match png", "path": "/v1/match", "params": {"format": "png"},
         "files": [("image_a", ("strip.png", strip)), ("image_b", ("photo.jpg", jpeg))]},
        {"name": "EPS file", "path": "/v1/features",
         "files": [("image", ("x.eps", b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nshowpage\n"))]},
        {"name": "truncated JPEG", "path": "/v1/features", "files": [("image", ("cut.jpg", jpeg[: len(jpeg) // 2]))]},
        {"name": "random bytes", "path": "/v1/features",
         "files": [("image", ("noise.bin", rng.integers(0, 256, 4096, dtype=np.uint8).tobytes()))]},
        {"name": "lenient parameter x=1_0", "path": "/v1/similarity", "params": {"x": "1_0", "y": "3"},
         "files": [("image", ("a.jpg", jpeg))]},
        {"name": "unknown feature id", "path": "/v1/similarity", "params": {"x": 1, "y": 1, "feature_id": "f" * 64}},
        {"name": "too many images", "path": "/v1/features",
         "files": [("image", (f"{i}.jpg", jpeg)) for i in range(max_images + 1)]},
        {"name": "100 KB header", "path": "/v1/models", "method": "GET", "headers": {"X-Filler": "a" * 100_000}},
        {"name": "half-sent head", "raw": b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Slow: "},
        {"name": "half-sent body", "raw": (b"POST /v1/features HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n"
                                           b"Content-Type: multipart/form-data; boundary=b\r\n\r\n--b\r\n")},
    ]


# -- measuring ---------------------------------------------------------------------------------------
class RssSampler(threading.Thread):
    def __init__(self, pid: int, period_s: float = 0.25):
        super().__init__(daemon=True)
        self.pid, self.period_s, self.peak = pid, period_s, 0.0
        self._done = threading.Event()

    def run(self) -> None:
        while not self._done.is_set():
            self.peak = max(self.peak, status_mb(self.pid))
            self._done.wait(self.period_s)

    def stop(self) -> float:
        self._done.set()
        self.join()
        return self.peak


class GoodTraffic:
    """The three good request kinds; uploads use a fresh image each time."""

    KINDS = ("upload", "click", "match")

    def __init__(self, url: str, size: int, count: int):
        import httpx

        self.images = synthetic_jpegs(count, size, seed=11)
        self._next = 0
        self._lock = threading.Lock()
        with httpx.Client(base_url=url, timeout=60) as http:
            ids = []
            for image in synthetic_jpegs(2, size, seed=12):
                r = http.post("/v1/features", files={"image": ("seed.jpg", image)})
                if r.status_code != 200:
                    raise BenchError(f"seeding the cache failed: {r.status_code} {r.text[:200]}")
                ids.append(r.headers["X-Feature-Id"])
        self.ids, self.size = ids, size

    def _image(self) -> bytes:
        with self._lock:
            self._next += 1
            return self.images[self._next % len(self.images)]

    def send(self, http, kind: str):
        if kind == "upload":
            return http.post("/v1/features", files={"image": ("good.jpg", self._image())})
        if kind == "click":
            x, y = random.uniform(0, self.size - 1), random.uniform(0, self.size - 1)
            return http.post("/v1/similarity", params={"x": x, "y": y, "format": "npy", "feature_id": self.ids[0]})
        return http.post("/v1/match", params={"feature_id_a": self.ids[0], "feature_id_b": self.ids[1]})


def _send_raw(url: str, raw: bytes, limit_s: float) -> str:
    """Send ``raw`` and hold the connection until the server closes it (or ``limit_s``)."""
    host, port = url.removeprefix("http://").split(":")
    try:
        with socket.create_connection((host, int(port)), timeout=limit_s) as conn:
            conn.sendall(raw)
            answer = conn.recv(4096)
            return "closed" if not answer else answer.split(b"\r\n", 1)[0].decode("latin-1")[9:12]
    except TimeoutError:
        return "held"
    except OSError:
        return "refused"


def _hostile_status(http, url: str, request: dict, limit_s: float) -> str:
    import httpx

    if "raw" in request:
        return _send_raw(url, request["raw"], limit_s)
    try:
        r = http.request(request.get("method", "POST"), request["path"], params=request.get("params"),
                         files=request.get("files"), headers=request.get("headers"))
        return str(r.status_code)
    except httpx.RemoteProtocolError:
        return "closed"
    except httpx.TransportError:
        return "refused"


def soak(url: str, good: GoodTraffic, hostile: list[dict], clients: int, hostile_clients: int,
         seconds: float, think_s: float) -> dict:
    import httpx

    deadline = time.monotonic() + seconds
    latencies = collections.defaultdict(list)  # good kind -> seconds of 200 answers
    statuses = collections.defaultdict(collections.Counter)  # kind or hostile name -> status counts
    lock = threading.Lock()

    def good_client(index: int) -> None:
        with httpx.Client(base_url=url, timeout=120) as http:
            turn = index
            while time.monotonic() < deadline:
                kind = GoodTraffic.KINDS[turn % 3]
                turn += 1
                started = time.perf_counter()
                try:
                    status = str(good.send(http, kind).status_code)
                except httpx.TransportError as exc:
                    status = type(exc).__name__
                elapsed = time.perf_counter() - started
                with lock:
                    statuses[kind][status] += 1
                    if status == "200":
                        latencies[kind].append(elapsed)
                time.sleep(max(0.0, min(think_s, deadline - time.monotonic())))

    def hostile_client(index: int) -> None:
        with httpx.Client(base_url=url, timeout=120) as http:
            turn = index
            while time.monotonic() < deadline:
                request = hostile[turn % len(hostile)]
                turn += 1
                status = _hostile_status(http, url, request, limit_s=max(1.0, deadline - time.monotonic() + 30))
                with lock:
                    statuses[request["name"]][status] += 1

    threads = [threading.Thread(target=hostile_client if i < hostile_clients else good_client, args=(i,))
               for i in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return {"latencies": latencies, "statuses": statuses}


def idle_latency(url: str, good: GoodTraffic, requests: int) -> dict:
    import httpx

    out = {}
    with httpx.Client(base_url=url, timeout=60) as http:
        for kind in GoodTraffic.KINDS:
            seconds = []
            for _ in range(requests + 1):
                started = time.perf_counter()
                r = good.send(http, kind)
                if r.status_code != 200:
                    raise BenchError(f"idle {kind} failed: {r.status_code} {r.text[:200]}")
                seconds.append(time.perf_counter() - started)
            out[kind] = statistics.median(seconds[1:])  # the first warms this kind's path
    return out


def _unexpected(status: str) -> bool:
    if status.isdigit():
        code = int(status)
        return code >= 500 and code not in EXPECTED_HOSTILE_5XX
    return status == "refused"


def _table(result: dict) -> str:
    rss = result["rss_mb"]
    lines = [f"soak: {result['minutes']} min, {result['clients']} clients ({result['hostile_clients']} hostile), "
             f"good clients pause {result['think_ms']:g} ms between requests",
             f"RSS MB: start {rss['start']:.0f}, peak {rss['peak']:.0f}, after {result['quiet_s']:.0f} s quiet "
             f"{rss['after_quiet']:.0f}",
             "good requests: phase, kind, served, idle ms, p50 ms, p99 ms, within 2x idle"]
    for phase, rows in result["good"].items():
        for kind, row in rows.items():
            lines.append(f"  {phase:<9} {kind:<7} {row['served']:6d} {row['idle_ms']:8.1f} {row['p50_ms']:8.1f} "
                         f"{row['p99_ms']:8.1f} {row['within_2x_idle_percent']:6.1f} %")
    lines.append(f"hostile requests: {result['hostile_total']} sent, unexpected answers: {result['unexpected']}")
    for name, counts in result["hostile"].items():
        lines.append(f"  {name:<40} {dict(counts)}")
    return "\n".join(lines)


def _good_rows(outcome: dict, idle: dict) -> dict:
    rows = {}
    for kind in GoodTraffic.KINDS:
        served = outcome["latencies"][kind]
        asked = sum(outcome["statuses"][kind].values())
        within = sum(1 for s in served if s <= 2 * idle[kind])
        rows[kind] = {
            "asked": asked, "served": len(served), "statuses": dict(outcome["statuses"][kind]),
            "idle_ms": 1000 * idle[kind],
            "p50_ms": 1000 * percentile(served, 50) if served else float("nan"),
            "p99_ms": 1000 * percentile(served, 99) if served else float("nan"),
            "within_2x_idle_percent": 100 * within / asked if asked else float("nan")}
    return rows


def run(args: argparse.Namespace) -> int:
    if not 0 <= args.hostile_clients < args.clients or args.minutes <= 0:
        raise BenchError("--hostile-clients must be below --clients and --minutes positive")
    from lift_serve.service.settings import Settings

    bundle = Path(args.bundle) if args.bundle else None
    if bundle is None:
        from lift_serve.model.demo import export_demo_bundle

        bundle = export_demo_bundle(Path(args.demo_dir) if args.demo_dir else Settings().demo_dir)
    server_env = dict(item.split("=", 1) for item in args.server_env if "=" in item)
    if len(server_env) != len(args.server_env) or not all(k.startswith("LIFT_") for k in server_env):
        raise BenchError("--server-env takes LIFT_NAME=VALUE")
    settings = Settings(bundle=bundle, **{k.removeprefix("LIFT_").lower(): v for k, v in server_env.items()})
    print("building the hostile corpus ...", flush=True)
    hostile = hostile_requests(settings.max_pixels, settings.max_images_per_request)
    with ServerProcess(bundle, server_env) as server:
        server.wait_ready()
        pid = server.process.pid
        good = GoodTraffic(server.url, args.size, count=4096)
        print("idle latency ...", flush=True)
        idle = idle_latency(server.url, good, args.idle_requests)
        rss_start = status_mb(pid)
        sampler = RssSampler(pid)
        sampler.start()
        phases = {}
        if args.baseline_minutes > 0:
            good_clients = args.clients - args.hostile_clients
            print(f"baseline: {good_clients} good clients alone, {args.baseline_minutes} min ...", flush=True)
            phases["good_only"] = soak(server.url, good, hostile, args.clients - args.hostile_clients, 0,
                                       args.baseline_minutes * 60, args.think_ms / 1000)
        print(f"soak: {args.minutes} min ...", flush=True)
        phases["mixed"] = soak(server.url, good, hostile, args.clients, args.hostile_clients, args.minutes * 60,
                               args.think_ms / 1000)
        outcome = phases["mixed"]
        peak = sampler.stop()
        print(f"quiet: {args.quiet_s:g} s ...", flush=True)
        time.sleep(args.quiet_s)
        rss_after = status_mb(pid)
        alive = server.process.poll() is None
    good_rows = {phase: _good_rows(result, idle) for phase, result in phases.items()}
    hostile_counts = {r["name"]: dict(outcome["statuses"][r["name"]]) for r in hostile}
    result = {
        "bundle": str(bundle), "server_env": server_env, "minutes": args.minutes, "clients": args.clients,
        "hostile_clients": args.hostile_clients, "think_ms": args.think_ms, "baseline_minutes": args.baseline_minutes,
        "quiet_s": args.quiet_s,
        "machine": machine_facts(),
        "rss_mb": {"start": rss_start, "peak": peak, "after_quiet": rss_after},
        "server_alive_at_end": alive,
        "good": good_rows, "hostile": hostile_counts,
        "hostile_total": sum(sum(c.values()) for c in hostile_counts.values()),
        "unexpected": sum(n for c in hostile_counts.values() for s, n in c.items() if _unexpected(s)),
    }
    write_report(result, args.out, _table(result))
    return 0 if alive else 1
