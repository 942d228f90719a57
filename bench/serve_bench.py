"""`lift bench serve`: the HTTP service under load, batching on versus off, and cached clicks.

What one run does, all on this machine:

1. **Raw model throughput**: the bundle's ``Runtime.run`` (in this process) on ``--size``
   inputs at batch sizes 1, 2, 4, 8, 16 (median of ``--raw-repeats`` calls each, after one warm-up)
   picks the best batch size, the reference below. The server runs with ``--max-batch-size``
   (default 8, the service default; on a CPU the sweep is nearly flat, so picking its noisy maximum
   as the server's batch size would just add noise).
2. **Service throughput**: for batching on, then off (``LIFT_BATCHING``), ``lift serve`` is started
   as a subprocess on 127.0.0.1 (free port) and driven by 1, 4, 16 concurrent clients (and 64 on a
   machine with 16 or more cores; asyncio + httpx, one connection each), ``--requests``
   ``POST /v1/features`` each, with float32 and then float16 answers (``--dtype``; batching off
   runs the first only). Every request carries a distinct JPEG (``--size`` square, so no resizing),
   so the feature cache never answers: each one is decoded, batched and run. Reported: images/s,
   p50/p99 latency, the mean batch size from the server's own ``lift_batch_size`` histogram, and
   where a request's time went (mean ms of each ``Server-Timing`` stage: read, decode, queue,
   inference, encode; see service/timing.py). Each level is bracketed by raw runs at the best
   batch size (server idle meanwhile) and compared with their mean: on a machine shared with other
   work, throughput drifts by tens of percent within minutes, so only numbers taken back to back
   are comparable.
3. **Upload size**: one client, no cache hits, alternating a 640x480 and a 12-megapixel JPEG
   (``--large-requests`` of each, interleaved so that drift hits both alike): median end-to-end
   latency of each, their ratio and their stage breakdowns. Both must become the same ``--size``
   model input, so this part runs on a server of the demo recipe exported at that size alone (a
   bundle with 224 and 448 sends both files to 448); with ``--bundle``, on that bundle, and the
   JSON records the input size each file got. The 12-megapixel file is decoded at a reduced DCT
   scale (Pillow's ``draft``).
4. **Cached click**: with batching on, one image is uploaded to ``/v1/similarity`` once, then
   ``--clicks`` clicks at random points send only its feature id; p50/p99 latency for the default
   PNG heat map (overlay on) and for the ``npy`` map.

The bundle is ``--bundle`` or, by default, the demo bundle (ViT-S/16 at 224 and 448, random weights,
untrained LiFT; speed does not depend on the weights), exported once with torch and reused.
JSON goes to ``--out``; a table is printed. Targets: at 16 clients with batching >= 90 % of the raw
batched throughput (float32 and float16 answers); a 12-megapixel upload <= 1.15x a 640x480 one end
to end; cached click p50 <= 15 ms at 224.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from lift_serve.bench.report import machine_facts, write_report
from lift_serve.service.timing import STAGES, parse_header

HELP = "benchmark `lift serve`: 1/4/16 clients, batching on vs off, raw model throughput, cached clicks"
DEFAULT_OUT = "runs/bench_serve.json"
RAW_BATCHES = (1, 2, 4, 8, 16)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--bundle", default=None, metavar="DIR",
                        help="bundle to serve (default: the demo bundle, exported once to --demo-dir)")
    parser.add_argument("--demo-dir", default=None, metavar="DIR",
                        help="demo bundle cache (default: LIFT_DEMO_DIR or ~/.cache/lift-serve/demo-bundle)")
    parser.add_argument("--size", type=int, default=224, help="square image size; must be a bundle size (224)")
    parser.add_argument("--iterations", type=int, default=None, help="LiFT iterations (default: the bundle's)")
    parser.add_argument("--concurrency", default=None,
                        help="client counts (default: 1,4,16, and 64 with 16 or more cores)")
    parser.add_argument("--requests", type=int, default=64, help="requests per client count (default: 64)")
    parser.add_argument("--max-batch-size", type=int, default=8,
                        help="LIFT_MAX_BATCH_SIZE with batching on (default: 8, the service default); "
                             "0 = the best batch size of the raw sweep")
    parser.add_argument("--max-wait-ms", type=float, default=5.0, help="LIFT_MAX_WAIT_MS (default: 5)")
    parser.add_argument("--dtype", default="float32,float16",
                        help="answer dtypes asked, in turn (default: %(default)s; batching off runs the first)")
    parser.add_argument("--large-requests", type=int, default=16,
                        help="requests of each upload size in the upload-size comparison (default: 16)")
    parser.add_argument("--clicks", type=int, default=200, help="cached clicks timed (default: 200)")
    parser.add_argument("--raw-repeats", type=int, default=3, help="timed raw calls per measurement (default: 3)")
    parser.add_argument("--providers", default="cpu", help="LIFT_PROVIDERS for both raw and served (default: cpu)")
    parser.add_argument("--out", default=DEFAULT_OUT, help="JSON results (default: %(default)s)")


class BenchError(ValueError):
    user_facing = True


# -- inputs ------------------------------------------------------------------------------------------
def synthetic_jpegs(count: int, size: int, seed: int = 0, height: int | None = None) -> list[bytes]:
    """``count`` distinct photo-like JPEGs (smooth colour fields + texture), ``size`` wide and
    ``height`` (default ``size``) high."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    height = height or size
    out = []
    for _ in range(count):
        coarse = rng.integers(0, 256, (7, 7, 3), dtype=np.uint8)
        smooth = np.asarray(Image.fromarray(coarse).resize((size, height), Image.Resampling.BICUBIC), np.int16)
        texture = rng.integers(-12, 13, (height, size, 3), dtype=np.int16)
        buffer = io.BytesIO()
        Image.fromarray(np.clip(smooth + texture, 0, 255).astype(np.uint8)).save(buffer, "JPEG", quality=90)
        out.append(buffer.getvalue())
    return out


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[index]


# -- raw model -----------------------------------------------------------------------------------------
def open_runtime(bundle: Path, size: int, providers: str):
    from lift_serve.service.runtime import open_runtime

    runtime = open_runtime(bundle, providers=providers)
    if (size, size) not in runtime.sizes:
        raise BenchError(f"--size {size} is not one of the bundle's sizes {runtime.sizes}")
    return runtime


def raw_throughput(runtime, size: int, batch: int, iterations: int | None, repeats: int) -> dict:
    """Median images/s of ``runtime.run`` on a ``[batch, size, size, 3]`` batch (one untimed warm-up).
    The batch is decoded from the same kind of JPEGs the server gets: ONNX Runtime on the CPU runs
    about 7 % slower on uniform noise than on photo-like pixels (measured here), which would bias
    the reference."""
    import numpy as np
    from PIL import Image

    images = np.stack([np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
                       for data in synthetic_jpegs(batch, size, seed=1000 + batch)])
    runtime.run(images, iterations)
    seconds = []
    for _ in range(repeats):
        started = time.perf_counter()
        runtime.run(images, iterations)
        seconds.append(time.perf_counter() - started)
    median = statistics.median(seconds)
    return {"batch": batch, "median_batch_ms": 1000 * median, "images_per_s": batch / median}


def measure_raw(runtime, size: int, iterations: int | None, repeats: int) -> dict:
    rows = [raw_throughput(runtime, size, batch, iterations, repeats) for batch in RAW_BATCHES]
    best = max(rows, key=lambda r: r["images_per_s"])
    return {"by_batch": rows, "best_batch": best["batch"], "best_images_per_s": best["images_per_s"],
            "providers": runtime.active_providers,
            "iterations": runtime.default_iterations if iterations is None else iterations}


# -- server --------------------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class ServerProcess:
    """``lift serve`` in a subprocess on 127.0.0.1; always stopped by ``__exit__``."""

    def __init__(self, bundle: Path, env: dict[str, str]):
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = tempfile.NamedTemporaryFile(prefix="lift-bench-serve-", suffix=".log", delete=False)
        command = [sys.executable, "-m", "lift_serve.cli", "serve",
                   "--bundle", str(bundle), "--host", "127.0.0.1", "--port", str(self.port), "--log-level", "warning"]
        self.process = subprocess.Popen(command, env={**os.environ, **env}, stdout=self.log, stderr=subprocess.STDOUT,
                                        cwd=Path(__file__).resolve().parents[1])

    def wait_ready(self, timeout_s: float = 180) -> None:
        import httpx

        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise BenchError(f"the server exited with {self.process.returncode}: {self.log_tail()}")
            try:
                if httpx.get(self.url + "/readyz", timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        raise BenchError(f"the server was not ready within {timeout_s} s: {self.log_tail()}")

    def log_tail(self) -> str:
        return Path(self.log.name).read_text(errors="replace")[-2000:]

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.process.terminate()
        try:
            self.process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.log.close()
        os.unlink(self.log.name)


def _metric(text: str, name: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[-1])
    return 0.0


async def _drive(url: str, images: list[bytes], concurrency: int, params: dict) -> dict:
    """``len(images)`` feature requests from ``concurrency`` clients; latencies and server batch sizes."""
    import httpx

    latencies: list[float] = []
    failures: list[str] = []
    stages: list[dict[str, float]] = []
    queue = list(reversed(images))

    async def client_loop(client):
        while queue:
            data = queue.pop()
            started = time.perf_counter()
            r = await client.post("/v1/features", params=params, content=data, headers={"content-type": "image/jpeg"})
            latencies.append(time.perf_counter() - started)
            if r.status_code != 200:
                failures.append(f"{r.status_code} {r.text[:200]}")
            else:
                r.content  # noqa: B018 - the body is part of the cost a client pays
                stages.append(parse_header(r.headers.get("server-timing", "")))

    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as client:
        before = (await client.get("/metrics")).text
        started = time.perf_counter()
        await asyncio.gather(*(client_loop(client) for _ in range(concurrency)))
        wall = time.perf_counter() - started
        after = (await client.get("/metrics")).text
    batches = _metric(after, "lift_batch_size_count") - _metric(before, "lift_batch_size_count")
    batched_images = _metric(after, "lift_batch_size_sum") - _metric(before, "lift_batch_size_sum")
    if failures:
        raise BenchError(f"{len(failures)} requests failed, e.g. {failures[0]}")
    return {"concurrency": concurrency, "requests": len(images), "seconds": wall,
            "images_per_s": len(images) / wall,
            "p50_ms": 1000 * percentile(latencies, 50), "p99_ms": 1000 * percentile(latencies, 99),
            "mean_batch_size": batched_images / batches if batches else None,
            "stages_mean_ms": mean_stages(stages)}


def mean_stages(stages: list[dict[str, float]]) -> dict[str, float]:
    """Mean milliseconds of each Server-Timing stage over requests (0 where a request skipped it)."""
    names = [s for s in (*STAGES, "total") if any(s in row for row in stages)]
    return {name: statistics.fmean(row.get(name, 0.0) for row in stages) for name in names} if stages else {}


async def _upload_sizes(url: str, small: list[bytes], large: list[bytes]) -> dict:
    """One client alternating small and large uploads (no cache hits): median latency of each and stages."""
    import httpx

    times: dict[str, list[float]] = {"small": [], "large": []}
    stages: dict[str, list[dict]] = {"small": [], "large": []}
    inputs: dict[str, str | None] = {}
    async with httpx.AsyncClient(base_url=url, timeout=120) as client:
        for pair in zip(small, large, strict=True):
            for name, data in zip(("small", "large"), pair, strict=True):
                started = time.perf_counter()
                r = await client.post("/v1/features", content=data, headers={"content-type": "image/jpeg"})
                r.content  # noqa: B018
                times[name].append(time.perf_counter() - started)
                if r.status_code != 200:
                    raise BenchError(f"upload failed: {r.status_code} {r.text[:200]}")
                stages[name].append(parse_header(r.headers.get("server-timing", "")))
                inputs[name] = r.headers.get("x-input-size")
    out = {name: {"median_ms": 1000 * statistics.median(times[name]), "bytes": statistics.median(
        len(d) for d in (small if name == "small" else large)), "stages_mean_ms": mean_stages(stages[name]),
        "input_size": inputs[name]} for name in times}
    out["large_over_small"] = out["large"]["median_ms"] / out["small"]["median_ms"]
    return out


async def _clicks(url: str, image: bytes, size: int, count: int, iterations: int | None) -> dict:
    import httpx
    import numpy as np

    rng = np.random.default_rng(1)
    base = {} if iterations is None else {"iterations": iterations}
    async with httpx.AsyncClient(base_url=url, timeout=60) as client:
        first = await client.post("/v1/similarity", params={"x": size / 2, "y": size / 2, **base},
                                  files={"image": ("click.jpg", image, "image/jpeg")})
        if first.status_code != 200:
            raise BenchError(f"similarity failed: {first.status_code} {first.text[:200]}")
        fid = first.headers["x-feature-id"]
        out = {}
        variants = {"png": {"format": "png"}, "png_overlay": {"format": "png", "overlay": "true"},
                    "npy": {"format": "npy"}}
        for name, variant in variants.items():
            latencies = []
            for _ in range(count):
                x, y = rng.uniform(0, size, 2)
                started = time.perf_counter()
                r = await client.post("/v1/similarity", params={"x": x, "y": y, "feature_id": fid, **variant})
                latencies.append(time.perf_counter() - started)
                if r.status_code != 200:
                    raise BenchError(f"cached click failed: {r.status_code} {r.text[:200]}")
            out[name] = {"clicks": count, "p50_ms": 1000 * percentile(latencies, 50),
                        "p99_ms": 1000 * percentile(latencies, 99)}
        hits = _metric((await client.get("/metrics")).text, "lift_cache_hits_total")
    out["cache_hits"] = hits
    return out


def _serve_and_measure(bundle: Path, batching: bool, args, levels: list[int], images: list[bytes],
                       max_batch_size: int, runtime, best_batch: int, dtypes: list[str]) -> dict:
    """One server; each client level is bracketed by raw runs at ``best_batch`` (server idle meanwhile),
    so that its "% of raw" compares numbers taken under the same background load."""
    env = {"LIFT_BATCHING": "true" if batching else "false", "LIFT_MAX_BATCH_SIZE": str(max_batch_size),
           "LIFT_MAX_WAIT_MS": str(args.max_wait_ms), "LIFT_PROVIDERS": args.providers,
           "LIFT_MAX_QUEUE": str(max(64, 4 * max(levels)))}
    base = {} if args.iterations is None else {"iterations": args.iterations}
    with ServerProcess(bundle, env) as server:
        server.wait_ready()
        asyncio.run(_drive(server.url, images[-8:], min(4, max(levels)), base))  # warm-up, not timed
        rows = []
        offset = 0
        for dtype in dtypes:
            for level in levels:
                chunk = images[offset:offset + args.requests]
                offset += args.requests
                before = raw_throughput(runtime, args.size, best_batch, args.iterations, args.raw_repeats)
                row = asyncio.run(_drive(server.url, chunk, level, {**base, "dtype": dtype}))
                after = raw_throughput(runtime, args.size, best_batch, args.iterations, args.raw_repeats)
                row["dtype"] = dtype
                row["raw_images_per_s"] = (before["images_per_s"] + after["images_per_s"]) / 2
                row["raw_before_after"] = [before["images_per_s"], after["images_per_s"]]
                row["percent_of_raw"] = 100 * row["images_per_s"] / row["raw_images_per_s"]
                rows.append(row)
                print(f"  batching={'on' if batching else 'off'} {dtype} clients={level}: "
                      f"{row['images_per_s']:.2f} img/s, raw {row['raw_images_per_s']:.2f} img/s", flush=True)
        clicks = asyncio.run(_clicks(server.url, images[-1], args.size, args.clicks, args.iterations)) \
            if batching else None
    return {"batching": batching, "env": env, "levels": rows, "clicks": clicks}


def _measure_upload_sizes(bundle: Path, args, uploads: tuple[list[bytes], list[bytes]]) -> dict:
    env = {"LIFT_MAX_WAIT_MS": str(args.max_wait_ms), "LIFT_PROVIDERS": args.providers}
    with ServerProcess(bundle, env) as server:
        server.wait_ready()
        asyncio.run(_upload_sizes(server.url, uploads[0][:1], uploads[1][:1]))  # warm-up, not timed
        out = asyncio.run(_upload_sizes(server.url, uploads[0][1:], uploads[1][1:]))
    out["bundle"] = str(bundle)
    return out


def _table(result: dict) -> str:
    raw = result["raw"]
    by_batch = ", ".join(f"b{r['batch']}={r['images_per_s']:.2f}" for r in raw["by_batch"])
    lines = [f"raw model sweep: best {raw['best_images_per_s']:.2f} img/s at batch {raw['best_batch']} ({by_batch}); "
             f"served with LIFT_MAX_BATCH_SIZE={result['max_batch_size']}, LIFT_MAX_WAIT_MS={result['max_wait_ms']:g}",
             "| batching | answer | clients | img/s | raw img/s around it | % of raw | p50 ms | p99 ms | mean batch "
             "| read / decode / queue / inference / encode ms |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |"]
    for run in result["service"]:
        for row in run["levels"]:
            mean = f"{row['mean_batch_size']:.2f}" if row["mean_batch_size"] else "-"
            mode = "on" if run["batching"] else "off"
            lines.append(f"| {mode} | {row['dtype']} | {row['concurrency']} | {row['images_per_s']:.2f} | "
                         f"{row['raw_images_per_s']:.2f} | {row['percent_of_raw']:.0f} % | {row['p50_ms']:.0f} | "
                         f"{row['p99_ms']:.0f} | {mean} | {_stages_text(row['stages_mean_ms'])} |")
    sizes = result["upload_sizes"]
    for name, label in (("small", "640x480"), ("large", "12 MP")):
        row = sizes[name]
        lines.append(f"{label} JPEG ({row['bytes'] / 1e6:.2f} MB) -> {row['input_size']}, one client: median "
                     f"{row['median_ms']:.0f} ms; stages {_stages_text(row['stages_mean_ms'])}")
    clicks = result["clicks"]
    for name in ("png", "png_overlay", "npy"):
        lines.append(f"cached click at {result['size']} ({name}): p50 {clicks[name]['p50_ms']:.1f} ms, "
                     f"p99 {clicks[name]['p99_ms']:.1f} ms")
    for name, target in result["targets"].items():
        verdict = "MET" if target["met"] else "MISSED"
        lines.append(f"target {name}: {target['value']:.2f} vs {target['goal']} -> {verdict}")
    return "\n".join(lines)


def _stages_text(stages: dict[str, float]) -> str:
    return " / ".join(f"{stages.get(name, 0.0):.1f}" for name in STAGES)


def default_levels() -> str:
    """1, 4 and 16 clients; 64 as well where the machine has the cores to drive and serve them."""
    return "1,4,16,64" if (os.cpu_count() or 1) >= 16 else "1,4,16"


def run(args: argparse.Namespace) -> int:
    levels = [int(v) for v in (args.concurrency or default_levels()).split(",") if v.strip()]
    dtypes = [d.strip() for d in args.dtype.split(",") if d.strip()]
    if not levels or min(levels) < 1 or args.requests < 1 or args.large_requests < 1:
        raise BenchError("--concurrency must list positive integers; --requests and --large-requests must be >= 1")
    if not dtypes or set(dtypes) - {"float32", "float16"}:
        raise BenchError(f"--dtype must list float32 and/or float16, got {args.dtype!r}")
    bundle = Path(args.bundle) if args.bundle else None
    upload_bundle = None
    if bundle is None:
        from lift_serve.model.demo import export_demo_bundle
        from lift_serve.service.settings import Settings

        # the same directory `lift serve --demo` uses (LIFT_DEMO_DIR), so the export is shared
        demo_dir = Path(args.demo_dir) if args.demo_dir else Settings().demo_dir
        bundle = export_demo_bundle(demo_dir)
        upload_bundle = export_demo_bundle(demo_dir.with_name(f"{demo_dir.name}-{args.size}"),
                                           sizes=((args.size, args.size),))
    print(f"raw model throughput ({bundle}) ...", flush=True)
    runtime = open_runtime(bundle, args.size, args.providers)
    raw = measure_raw(runtime, args.size, args.iterations, args.raw_repeats)
    best_batch = raw["best_batch"]
    max_batch_size = args.max_batch_size or best_batch
    images = synthetic_jpegs(args.requests * len(levels) * len(dtypes) + 8, args.size)
    # 640x480 and 4000x3000 (12 MP), distinct files; seeds apart from the square ones, so no cache hit.
    uploads = (synthetic_jpegs(args.large_requests + 1, 640, seed=100, height=480),
               synthetic_jpegs(args.large_requests + 1, 4000, seed=200, height=3000))
    service = [_serve_and_measure(bundle, True, args, levels, images, max_batch_size, runtime, best_batch, dtypes),
               _serve_and_measure(bundle, False, args, levels, images, max_batch_size, runtime, best_batch,
                                  dtypes[:1])]
    clicks = service[0]["clicks"]
    sizes = _measure_upload_sizes(upload_bundle or bundle, args, uploads)
    targets = {}
    for dtype in dtypes:
        top = next(r for r in service[0]["levels"] if r["concurrency"] == max(levels) and r["dtype"] == dtype)
        targets[f"throughput at {max(levels)} clients with batching, {dtype} answers, % of raw"] = {
            "value": top["percent_of_raw"], "goal": ">= 90", "met": top["percent_of_raw"] >= 90}
    targets["12 MP JPEG over 640x480 JPEG, end to end"] = {
        "value": sizes["large_over_small"], "goal": "<= 1.15", "met": sizes["large_over_small"] <= 1.15}
    result = {
        "bundle": str(bundle), "size": args.size, "iterations": raw["iterations"], "dtypes": dtypes,
        "requests_per_level": args.requests, "max_batch_size": max_batch_size, "max_wait_ms": args.max_wait_ms,
        "machine": machine_facts(),
        "raw": raw, "service": service, "clicks": clicks, "upload_sizes": sizes,
        "targets": {**targets, f"cached click p50 ms at {args.size} (png)": {
            "value": clicks["png"]["p50_ms"], "goal": "<= 15", "met": clicks["png"]["p50_ms"] <= 15}},
    }
    write_report(result, args.out, _table(result))
    return 0
