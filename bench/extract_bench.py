"""`lift bench extract`: `lift extract`'s throughput as a share of the raw runtime's, one run.

On a generated folder of ``--images`` JPEG photos (``--side`` px, noise over gradients), the same
bundle (``--bundle``, default the demo bundle, exported once) is timed twice in this process:

* **raw**: ``runtime.run`` on batches of ``--batch-size`` model inputs already in memory (the
  physical reference: no decode, no files);
* **extract**: :class:`lift_serve.service.extract.Extractor` over the folder into a fresh ``--out``
  folder (decode, batching, ``.npy`` files, the index), float16.

The result is images/s of each and their ratio (the target is >= 0.9). JSON goes to ``--out``.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

from lift_serve.bench.report import machine_facts, write_report

HELP = "lift extract's throughput as a ratio to the raw runtime on the same images"
DEFAULT_OUT = "runs/bench_extract.json"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--bundle", default=None, help="bundle directory (default: the demo bundle, exported once)")
    parser.add_argument("--images", type=int, default=32, help="generated photos (default: %(default)s)")
    parser.add_argument("--side", type=int, default=640, help="their width; height 3/4 of it (default: %(default)s)")
    parser.add_argument("--batch-size", type=int, default=8, help="(default: %(default)s)")
    parser.add_argument("--iterations", type=int, default=None, help="density (default: the bundle's)")
    parser.add_argument("--out", default=DEFAULT_OUT, help="JSON results (default: %(default)s)")


def _photos(folder: Path, count: int, side: int) -> None:
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    height = side * 3 // 4
    yy, xx = np.mgrid[0:height, 0:side]
    for i in range(count):
        base = np.stack([(xx / 3 + 17 * i) % 256, (yy / 2) % 256, ((xx + yy) / 5) % 256], -1)
        pixels = np.clip(base + rng.normal(0, 8, base.shape), 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(folder / f"{i:04d}.jpg", quality=90)


def run(args: argparse.Namespace) -> int:
    import numpy as np
    from lift_serve.service.extract import ExtractOptions, Extractor
    from lift_serve.service.runtime import open_runtime

    if args.bundle:
        bundle = Path(args.bundle)
    else:
        from lift_serve.demo import export_demo

        bundle = export_demo(Path("~/.cache/lift-serve/demo-bundle").expanduser())
    runtime = open_runtime(bundle, providers="cpu")
    scratch = Path(tempfile.mkdtemp(prefix="lift-bench-extract-"))
    try:
        (scratch / "images").mkdir()
        _photos(scratch / "images", args.images, args.side)
        options = ExtractOptions(iterations=args.iterations, batch_size=args.batch_size)
        extractor = Extractor(runtime, scratch / "images", scratch / "warm", options, str(bundle))
        prepared = [extractor._prepare(p)[3] for p in sorted((scratch / "images").iterdir())]
        k = options.iterations if options.iterations is not None else runtime.default_iterations
        runtime.run(np.stack(prepared[: args.batch_size]), k)  # warm-up
        started = time.perf_counter()
        for start in range(0, len(prepared), args.batch_size):
            runtime.run(np.stack(prepared[start:start + args.batch_size]), k)
        raw_s = time.perf_counter() - started
        started = time.perf_counter()
        counts = Extractor(runtime, scratch / "images", scratch / "out", options, str(bundle)).run()
        extract_s = time.perf_counter() - started
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    result = {"bundle": str(bundle), "images": args.images, "side": args.side, "batch_size": args.batch_size,
              "iterations": k, "raw_images_per_s": args.images / raw_s,
              "extract_images_per_s": counts["written"] / extract_s,
              "ratio_to_raw": (counts["written"] / extract_s) / (args.images / raw_s), "machine": machine_facts()}
    table = (f"raw runtime {result['raw_images_per_s']:.2f} img/s, lift extract {result['extract_images_per_s']:.2f} "
             f"img/s: {result['ratio_to_raw']:.2f} of raw")
    write_report(result, args.out, table)
    return 0
