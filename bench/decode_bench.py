"""`lift bench decode`: what one upload can cost to decode, and what a killable decoder would cost.

The hardening question this answers: should a request deadline end a running decode by killing a
decode *process*, or is it enough to refuse, before decoding, the files whose decoding is unbounded
(``codec.MAX_JPEG_SCANS`` scans, ``codec.MAX_JPEG_SEGMENTS`` segments, ``LIFT_MAX_PIXELS``)?
One run, all in this process and its children:

1. **Worst accepted decodes.** For each accepted format, a file at ``--max-pixels`` (the service
   default, 40 megapixels) decoded by ``codec.decode_image`` (pixels to 8-bit RGB), median of
   ``--repeats``. Files larger than the default upload limit (20 MiB) are marked: the service
   refuses them unread, so their times bound the worst accepted file from above. For JPEG also
   the scan dimension: a progressive file whose first scan is repeated
   (libjpeg decodes every repeat: this is how scan bombs are made) to 10 (ordinary), 64 (the limit,
   the worst accepted) and 256 scans (refused by the service; decoded here with Pillow directly to
   show what the limit avoids).
2. **A process pool instead.** ``concurrent.futures.ProcessPoolExecutor`` (forkserver, 2 workers,
   warmed) doing what the service's decode step does (decode, then resize to the model input) for
   a 640x480 and a 12-megapixel JPEG, against the same work in a thread: the added latency per
   upload (the bytes go to the worker, the model input comes back), each worker's resident memory,
   and the time to kill a busy worker and have a fresh pool answer again (what a deadline would pay).

JSON goes to ``--out``; a table is printed. Figures are ratios within one run: the machine is shared.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import io
import multiprocessing
import struct
import time

import numpy as np
from lift_serve.bench.measure import median_seconds, status_mb
from lift_serve.bench.report import machine_facts, write_report
from lift_serve.service import codec
from lift_serve.service.geometry import ImageGeometry
from PIL import Image

HELP = "decode cost of the worst accepted uploads, and of a killable decode process pool instead"
DEFAULT_OUT = "runs/bench_decode.json"
ORDINARY_SCANS, REFUSED_SCANS = 10, 256


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--max-pixels", type=int, default=40_000_000,
                        help="pixels of the worst accepted files (default: LIFT_MAX_PIXELS' default, %(default)s)")
    parser.add_argument("--repeats", type=int, default=3, help="timed decodes per file (default: 3)")
    parser.add_argument("--pool-requests", type=int, default=20, help="timed uploads per pool case (default: 20)")
    parser.add_argument("--out", default=DEFAULT_OUT, help="JSON results (default: %(default)s)")


# -- hostile and worst-case files ----------------------------------------------------------------------
def _scan_spans(data: bytes) -> list[tuple[int, int]]:
    """(start, end) of each scan (SOS header and its entropy-coded data) of a well-formed JPEG."""
    spans, position = [], 2
    while position + 4 <= len(data) and data[position + 1] != 0xD9:
        (length,) = struct.unpack_from(">H", data, position + 2)
        end = position + 2 + length
        if data[position + 1] == 0xDA:
            end = codec._NEXT_MARKER.search(data, end).start()
            spans.append((position, end))
        position = end
    return spans


def progressive_jpeg_with_scans(pixels: np.ndarray, scans: int, quality: int = 90) -> bytes:
    """A progressive JPEG of ``pixels`` with ``scans`` scans (at least Pillow's own count, about 10):
    the first scan is repeated; libjpeg decodes each repeat in full, as it does a scan bomb's."""
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "JPEG", progressive=True, quality=quality)
    data = buffer.getvalue()
    spans = _scan_spans(data)
    extra = scans - len(spans)
    if extra < 0:
        raise ValueError(f"Pillow already writes {len(spans)} scans; ask for at least that many")
    start, end = spans[0]
    return data[:end] + data[start:end] * extra + data[end:]


def _photo(width: int, height: int, seed: int = 0) -> np.ndarray:
    """Smooth colour fields plus texture: compresses like a photo, not like noise or a flat image."""
    rng = np.random.default_rng(seed)
    coarse = Image.fromarray(rng.integers(0, 256, (9, 12, 3), dtype=np.uint8))
    smooth = np.asarray(coarse.resize((width, height), Image.Resampling.BICUBIC), np.int16)
    texture = rng.integers(-16, 17, (height, width, 1), dtype=np.int16)
    return np.clip(smooth + texture, 0, 255).astype(np.uint8)


def _encode(pixels: np.ndarray, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, fmt, **options)
    return buffer.getvalue()


def worst_accepted(max_pixels: int, repeats: int) -> dict:
    from lift_serve.service.settings import Settings

    # Files over the upload limit are refused before decoding; their times are upper bounds.
    upload_limit = Settings.model_fields["max_upload_bytes"].default
    side = int(max_pixels ** 0.5)
    pixels = _photo(side, side)
    files = {
        "JPEG baseline": _encode(pixels, "JPEG", quality=95),
        f"JPEG progressive, {ORDINARY_SCANS} scans": progressive_jpeg_with_scans(pixels, ORDINARY_SCANS),
        f"JPEG progressive, {codec.MAX_JPEG_SCANS} scans (limit)": progressive_jpeg_with_scans(
            pixels, codec.MAX_JPEG_SCANS),
        "PNG": _encode(pixels, "PNG", compress_level=6),
        "PNG 16-bit gray": _encode((pixels[..., 0].astype(np.uint16) * 257), "PNG"),
        "TIFF deflate": _encode(pixels, "TIFF", compression="tiff_adobe_deflate"),
        "WEBP": _encode(pixels, "WEBP", quality=80, method=0),
        "GIF": _encode(pixels, "GIF"),
        "BMP": _encode(pixels, "BMP"),
    }
    rows = []
    for name, data in files.items():
        codec.read_header(data, max_pixels)  # accepted by the service's checks
        rows.append({"file": name, "bytes": len(data), "pixels": side * side,
                     "over_upload_limit": len(data) > upload_limit,
                     "decode_s": median_seconds(lambda d=data: codec.decode_image(d, max_pixels), repeats)})
    refused = progressive_jpeg_with_scans(pixels, REFUSED_SCANS)
    try:
        codec.read_header(refused, max_pixels)
        refused_status = "accepted"
    except codec.ImageError as exc:
        refused_status = f"{exc.status} {exc.code}"

    def pillow_decode():
        with Image.open(io.BytesIO(refused)) as image:
            image.load()

    rows.append({"file": f"JPEG progressive, {REFUSED_SCANS} scans (refused: {refused_status})",
                 "bytes": len(refused), "pixels": side * side, "decode_s": median_seconds(pillow_decode, 1)})
    return {"max_pixels": max_pixels, "side": side, "max_upload_bytes": upload_limit, "rows": rows,
            "worst_accepted_s": max(r["decode_s"] for r in rows if "refused" not in r["file"])}


# -- a process pool instead --------------------------------------------------------------------------
def _model_input(data: bytes) -> np.ndarray:
    """The service's decode step: decode, then resize to the model input (224, aspect kept)."""
    header = codec.read_header(data, 40_000_000)
    geometry = ImageGeometry.plan(header.width, header.height, [(224, 224)], "keep_aspect", 16)
    return geometry.prepare(codec.decode_image(data, 40_000_000))


def _busy(seconds: float) -> None:
    time.sleep(seconds)


def process_pool(requests: int) -> dict:
    cases = {"640x480 JPEG": _encode(_photo(640, 480, 1), "JPEG", quality=90),
             "12 MP JPEG (4000x3000)": _encode(_photo(4000, 3000, 2), "JPEG", quality=90)}
    context = multiprocessing.get_context("forkserver")
    rows = []
    with concurrent.futures.ThreadPoolExecutor(2) as threads, \
            concurrent.futures.ProcessPoolExecutor(2, mp_context=context) as pool:
        list(pool.map(_model_input, list(cases.values()) * 2))  # start and warm both workers
        workers = [status_mb(p.pid) for p in pool._processes.values()]
        for name, data in cases.items():
            thread_s = median_seconds(lambda d=data: threads.submit(_model_input, d).result(), requests)
            pool_s = median_seconds(lambda d=data: pool.submit(_model_input, d).result(), requests)
            rows.append({"upload": name, "bytes": len(data), "thread_ms": 1000 * thread_s, "pool_ms": 1000 * pool_s,
                         "added_ms": 1000 * (pool_s - thread_s), "added_percent": 100 * (pool_s / thread_s - 1)})
        # What a deadline pays: kill the busy worker, then a fresh pool must answer (the executor is
        # broken once a worker dies, so a real service would rebuild it the same way).
        pool.submit(_busy, 30)
        time.sleep(0.2)
        started = time.perf_counter()
        for process in pool._processes.values():
            process.kill()
    with concurrent.futures.ProcessPoolExecutor(2, mp_context=context) as fresh:
        fresh.submit(_model_input, cases["640x480 JPEG"]).result()
        respawn_s = time.perf_counter() - started
    return {"workers": 2, "start_method": "forkserver", "worker_rss_mb": workers, "rows": rows,
            "kill_and_respawn_s": respawn_s}


def _table(result: dict) -> str:
    lines = [f"worst accepted decodes at {result['decode']['max_pixels']} pixels (median s):"]
    lines += [f"  {r['file']:<58} {r['bytes'] / 1e6:7.2f} MB{'*' if r.get('over_upload_limit') else ' '} "
              f"{r['decode_s']:6.2f} s" for r in result["decode"]["rows"]]
    lines.append("  (* over LIFT_MAX_UPLOAD_BYTES' default: refused unread by the service, so an upper bound)")
    pool = result["pool"]
    rss = ", ".join(f"{m:.0f}" for m in pool["worker_rss_mb"])
    lines.append(f"process pool ({pool['workers']} workers, RSS {rss} MB; "
                 f"kill + respawn {pool['kill_and_respawn_s']:.2f} s):")
    lines += [f"  {r['upload']:<25} thread {r['thread_ms']:7.1f} ms  pool {r['pool_ms']:7.1f} ms  "
              f"(+{r['added_percent']:.0f} %)" for r in pool["rows"]]
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    print("decoding the worst accepted files ...", flush=True)
    decode = worst_accepted(args.max_pixels, args.repeats)
    print("timing a decode process pool ...", flush=True)
    pool = process_pool(args.pool_requests)
    result = {"machine": machine_facts(),
              "decode": decode, "pool": pool}
    write_report(result, args.out, _table(result))
    return 0
