"""`lift bench export`: PyTorch eager DenseExtractor versus the ONNX Runtime bundle.

Model: ViT-S/16 (``vit_small_patch16_224``, random weights, seed 0, key facet of the last block)
with an untrained LiFT: exactly the demo bundle (``model.export.export_demo_bundle``), which is
exported once and reused. Speed does not depend on the weights' values.

For every size (224, 448), batch (1, 8) and LiFT iteration count (0 = backbone only, 1 = +LiFT)
both engines run the same function, uint8 ``[B, H, W, 3]`` pixels -> features, normalisation
included. Each configuration gets one untimed warm-up call per engine, then ``--repeats`` timed
calls alternating PyTorch and ORT, so that load from other processes hits both alike; the
minimum is reported by default (``--stat``), the least disturbed by other processes, and every
sample (wall and CPU time) is kept in the JSON. Both use all cores by default
(``torch.get_num_threads()``, ORT intra-op 0).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

HELP = "benchmark PyTorch eager vs the ONNX Runtime bundle (ViT-S/16 +/- LiFT, batch 1/8, 224/448)"
DEFAULT_OUT = "runs/bench_export.json"
DEFAULT_BUNDLE = "runs/bench_export_bundle"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default=DEFAULT_OUT, help="JSON results (default: %(default)s)")
    parser.add_argument("--bundle", default=DEFAULT_BUNDLE,
                        help="where the ViT-S/16 bundle is exported once and reused (default: %(default)s)")
    parser.add_argument("--sizes", default="224,448", help="square input sizes (default: %(default)s)")
    parser.add_argument("--batches", default="1,8", help="batch sizes (default: %(default)s)")
    parser.add_argument("--repeats", type=int, default=5,
                        help="timed calls per engine and setting; the median is reported (default: %(default)s)")
    parser.add_argument("--threads", type=int, default=0,
                        help="threads for both engines; 0 = all cores (default: %(default)s)")
    parser.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                        help="what the table and ratios use: wall-clock time, or this process's CPU time "
                             "(robust when other processes share the cores; meaningful with --threads 1). "
                             "Both are always recorded in the JSON (default: %(default)s)")
    parser.add_argument("--stat", choices=("min", "median"), default="min",
                        help="statistic over repeats; min suits a shared machine, where other processes "
                             "only ever add time (default: %(default)s)")
    parser.add_argument("--graph-optimization", default="all", choices=("disable", "basic", "extended", "all"),
                        help="ONNX Runtime graph optimisation level (default: %(default)s)")


def _int_list(text: str, flag: str) -> list[int]:
    from lift_serve.model.options import OptionError

    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        values = []
    if not values or min(values) <= 0:
        raise OptionError(f"{flag} must be comma-separated positive integers, got {text!r}")
    return values


def _timed(fn) -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process, all threads) of one call."""
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - wall, time.process_time() - cpu


def _row(engine, k, size, batch, samples: list[tuple[float, float]], clock: str, stat: str) -> dict:
    wall = [s[0] for s in samples]
    cpu = [s[1] for s in samples]
    chosen = wall if clock == "wall" else cpu
    value = min(chosen) if stat == "min" else statistics.median(chosen)
    return {"engine": engine, "iterations": k, "size": size, "batch": batch, "repeats": len(samples),
            "clock": clock, "stat": stat, "wall_seconds": wall, "cpu_seconds": cpu,
            "median_batch_ms": 1000 * statistics.median(chosen), "min_batch_ms": 1000 * min(chosen),
            "ms_per_image": 1000 * value / batch, "images_per_s": batch / value}


def _measure(graphs, runtime, sizes, batches, repeats, clock, stat) -> list[dict]:
    import numpy as np
    import torch
    from lift_serve.model.export import natural_image

    rows = []
    for size in sizes:
        for batch in batches:
            images = np.stack([natural_image(size, size, seed=i) for i in range(batch)])
            tensor = torch.from_numpy(images)
            for k, graph in graphs.items():
                def eager(graph=graph, tensor=tensor):
                    with torch.inference_mode():
                        graph(tensor)

                def ort(k=k, images=images):
                    runtime.run(images, k)

                eager()
                ort()
                times = {"pytorch": [], "onnxruntime": []}
                for _ in range(repeats):
                    times["pytorch"].append(_timed(eager))
                    times["onnxruntime"].append(_timed(ort))
                for engine, seconds in times.items():
                    rows.append(_row(engine, k, size, batch, seconds, clock, stat))
                    print(f"  {engine:<12} k={k} {size}px batch {batch}: {rows[-1]['ms_per_image']:.1f} ms/image",
                          flush=True)
    return rows


_RSS_PROBE = """
import json, sys
import numpy as np
import onnxruntime as ort

def rss():
    with open("/proc/self/status") as f:
        return int(f.read().split("VmRSS:")[1].split()[0]) * 1024

fmt, size, threads, paths = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4:]
base = rss()
options = ort.SessionOptions()
options.intra_op_num_threads = threads
sessions = [ort.InferenceSession(p, sess_options=options, providers=["CPUExecutionProvider"]) for p in paths]
loaded = rss()
image = np.zeros((1, size, size, 3), np.uint8)
if fmt == "format1":
    for s in sessions:
        s.run(None, {"image": image})
else:
    backbone, prepare, step = sessions
    (features,) = backbone.run(None, {"image": image})
    (state,) = prepare.run(None, {"image": image})
    step.run(None, {"state": state, "features": features})
print(json.dumps({"loaded_bytes": loaded - base, "after_first_run_bytes": rss() - base}))
"""


def _rss(fmt: str, paths: list[Path], size: int, threads: int) -> dict:
    """Resident memory a fresh process gains by opening these graphs, and after running each once."""
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-c", _RSS_PROBE, fmt, str(size), str(threads), *map(str, paths)],
                          capture_output=True, text=True, timeout=600, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def format1_graphs(bundle: Path, backbone, lift, iterations) -> list[Path]:
    """Format 1's fused graphs (backbone + k LiFT rounds in each), exported once beside the bundle."""
    from lift_serve.model.extractor import DenseExtractor
    from lift_serve.model.onnx_graphs import FEATURES, FusedGraph, export_image_graph

    folder = bundle.parent / f"{bundle.name}-format1"
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for k in iterations:
        path = folder / f"model_k{k}.onnx"
        if not path.is_file():
            print(f"exporting format 1's fused graph {path.name} for comparison", flush=True)
            graph = FusedGraph(DenseExtractor(backbone, lift if k else None, k).eval()).eval()
            export_image_graph(graph, FEATURES, path, backbone.patch_size, None)
        paths.append(path)
    return paths


def compare_formats(runtime, bundle: Path, fused: list[Path], size: int, repeats: int, threads: int) -> dict:
    """Bundle format 2 (backbone once, upsampler on demand) against format 1 (one fused graph per
    density), ViT-S/16 + LiFT at ``size``, batch 1, measured in one run."""
    import onnxruntime as ort
    from lift_serve.model.parity import natural_image

    f2_paths = [bundle / g.file for g in runtime.manifest.graph_files().values()]
    bytes_f2 = sum(p.stat().st_size for p in f2_paths)
    bytes_f1 = sum(p.stat().st_size for p in fused)
    rss_f2 = _rss("format2", f2_paths, size, threads)
    rss_f1 = _rss("format1", fused, size, threads)
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    fused_k1 = ort.InferenceSession(str(fused[-1]), sess_options=options, providers=["CPUExecutionProvider"])
    images = natural_image(size, size, seed=11)[None]
    coarse = runtime.embed(images)
    calls = {
        "format2_full_density1": lambda: runtime.run(images, 1),
        "format2_cached_density1": lambda: runtime.upsample(images, coarse, 1),
        "format1_fused_density1": lambda: fused_k1.run(None, {"image": images}),
    }
    for call in calls.values():
        call()
    samples = {name: [] for name in calls}
    for _ in range(repeats):
        for name, call in calls.items():  # interleaved, so load from other processes hits all alike
            samples[name].append(_timed(call)[0])
    best = {name: 1000 * min(values) for name, values in samples.items()}
    return {
        "size": size, "batch": 1, "repeats": repeats, "stat": "min wall ms",
        "bundle_bytes": {"format2": bytes_f2, "format1": bytes_f1, "ratio": bytes_f2 / bytes_f1,
                         "format2_files": {p.name: p.stat().st_size for p in f2_paths},
                         "format1_files": {p.name: p.stat().st_size for p in fused}},
        "resident_memory_bytes": {"format2": rss_f2, "format1": rss_f1,
                                  "ratio_loaded": rss_f2["loaded_bytes"] / rss_f1["loaded_bytes"],
                                  "ratio_after_first_run": rss_f2["after_first_run_bytes"]
                                  / rss_f1["after_first_run_bytes"]},
        "latency_ms": best,
        "cached_density1_over_full_pass": best["format2_cached_density1"] / best["format2_full_density1"],
        "first_request_density1_format2_over_format1": best["format2_full_density1"]
        / best["format1_fused_density1"],
        "notes": "cached = an image whose backbone features are cached (prepare + 1 step); full = backbone + "
                 "prepare + 1 step for a new image; format 1 = the fused backbone+LiFT graph of the old bundle "
                 "layout. Resident memory: what a fresh process gains by opening the graphs (and after one run).",
    }


def summarise(rows: list[dict]) -> dict:
    """Ratios: ORT speed-up over PyTorch (per-image latency ratio) and LiFT's latency overhead."""
    index = {(r["engine"], r["iterations"], r["size"], r["batch"]): r["ms_per_image"] for r in rows}
    speedup, overhead = {}, {}
    for engine, k, size, batch in index:
        if engine == "pytorch" and ("onnxruntime", k, size, batch) in index:
            key = f"k{k}_{size}_b{batch}"
            speedup[key] = index[(engine, k, size, batch)] / index[("onnxruntime", k, size, batch)]
        if k == 1 and (engine, 0, size, batch) in index:
            base = index[(engine, 0, size, batch)]
            overhead[f"{engine}_{size}_b{batch}"] = (index[(engine, 1, size, batch)] - base) / base
    return {"ort_speedup_over_pytorch": speedup, "lift_latency_overhead": overhead}


def print_table(rows: list[dict], summary: dict) -> None:
    index = {(r["engine"], r["iterations"], r["size"], r["batch"]): r for r in rows}
    keys = sorted({(r["size"], r["batch"], r["iterations"]) for r in rows})
    print(f"\nper-image latency by {rows[0]['clock']} time ({rows[0]['stat']} of repeats); "
          "ORT/PyTorch = PyTorch latency / ORT latency")
    print(f"{'size':>5} {'batch':>5} {'model':<12} {'PyTorch ms/img':>15} {'ORT ms/img':>11} "
          f"{'PyTorch img/s':>14} {'ORT img/s':>10} {'ORT/PyTorch':>12}")
    for size, batch, k in keys:
        t, o = index[("pytorch", k, size, batch)], index[("onnxruntime", k, size, batch)]
        name = "ViT-S/16" if k == 0 else f"+LiFT x{k}"
        print(f"{size:>5} {batch:>5} {name:<12} {t['ms_per_image']:>15.1f} {o['ms_per_image']:>11.1f} "
              f"{t['images_per_s']:>14.2f} {o['images_per_s']:>10.2f} "
              f"{t['ms_per_image'] / o['ms_per_image']:>11.2f}x")
    print("\nLiFT latency overhead over the backbone alone (k=1 vs k=0, per image):")
    for key, value in sorted(summary["lift_latency_overhead"].items()):
        print(f"  {key:<22} {100 * value:+6.1f} %")


def print_formats(formats: dict) -> None:
    b, m, t = formats["bundle_bytes"], formats["resident_memory_bytes"], formats["latency_ms"]
    print(f"  bundle bytes      format 2 {b['format2'] / 1e6:7.1f} MB   format 1 {b['format1'] / 1e6:7.1f} MB   "
          f"ratio {b['ratio']:.2f}")
    print(f"  RSS after load    format 2 {m['format2']['loaded_bytes'] / 1e6:7.1f} MB   format 1 "
          f"{m['format1']['loaded_bytes'] / 1e6:7.1f} MB   ratio {m['ratio_loaded']:.2f}")
    print(f"  RSS after a run   format 2 {m['format2']['after_first_run_bytes'] / 1e6:7.1f} MB   format 1 "
          f"{m['format1']['after_first_run_bytes'] / 1e6:7.1f} MB   ratio {m['ratio_after_first_run']:.2f}")
    print(f"  density 1 at {formats['size']}px: new image {t['format2_full_density1']:.1f} ms (format 1 fused "
          f"{t['format1_fused_density1']:.1f} ms, ratio {formats['first_request_density1_format2_over_format1']:.2f}); "
          f"cached image {t['format2_cached_density1']:.1f} ms "
          f"({formats['cached_density1_over_full_pass']:.2f} of the full pass)")


def run(args: argparse.Namespace) -> int:
    import numpy as np
    import onnxruntime
    import torch
    from lift_serve.model.demo import DEMO_ITERATIONS, demo_modules, export_demo_bundle
    from lift_serve.model.extractor import DenseExtractor
    from lift_serve.model.onnx_graphs import FusedGraph
    from lift_serve.service.runtime import open_runtime

    sizes = _int_list(args.sizes, "--sizes")
    batches = _int_list(args.batches, "--batches")
    if args.repeats < 1 or args.threads < 0:
        from lift_serve.model.options import OptionError

        raise OptionError(f"--repeats must be >= 1 and --threads >= 0 (0 = all cores), got {args.repeats} "
                          f"and {args.threads}")
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"bundle: {args.bundle} (exported once, then reused)", flush=True)
    bundle = export_demo_bundle(args.bundle)
    runtime = open_runtime(bundle, providers=["cpu"], intra_op_threads=args.threads,
                           graph_optimization=args.graph_optimization, warmup=False)
    unsupported = [s for s in sizes if (s, s) not in runtime.sizes]
    if unsupported:
        from lift_serve.model.options import OptionError

        raise OptionError(f"--sizes {unsupported} not in the bundle's sizes {runtime.sizes}")
    backbone, lift = demo_modules()
    graphs = {k: FusedGraph(DenseExtractor(backbone, lift if k else None, k).eval()).eval() for k in DEMO_ITERATIONS}
    print(f"threads: torch {torch.get_num_threads()}, ORT intra-op {args.threads or 'all cores'}; "
          f"repeats {args.repeats} ({args.stat} of {args.clock} time), graph optimisation {args.graph_optimization}, "
          f"load average {os.getloadavg()[0]:.1f}", flush=True)
    load_before = os.getloadavg()
    rows = _measure(graphs, runtime, sizes, batches, args.repeats, args.clock, args.stat)
    load_after = os.getloadavg()
    summary = summarise(rows)
    print_table(rows, summary)
    print("\nbundle format 2 vs format 1 (fused graphs), one run:", flush=True)
    formats = compare_formats(runtime, Path(bundle), format1_graphs(Path(bundle), backbone, lift, DEMO_ITERATIONS),
                              min(sizes), args.repeats, args.threads)
    print_formats(formats)
    manifest = runtime.manifest
    result = {
        "model": "vit_small_patch16_224 (random, seed 0) + LiFT(384, 16) (untrained, seed 0)",
        "config": {"sizes": sizes, "batches": batches, "repeats": args.repeats, "threads": args.threads,
                   "torch_threads": torch.get_num_threads(), "graph_optimization": args.graph_optimization,
                   "clock": args.clock, "stat": args.stat,
                   "load_average_1m_before_after": [load_before[0], load_after[0]],
                   "torch": torch.__version__, "onnxruntime": onnxruntime.__version__,
                   "providers": runtime.active_providers, "cpu_count": os.cpu_count(),
                   "processor": platform.processor() or platform.machine(), "numpy": np.__version__},
        "results": rows,
        "summary": summary,
        "formats": formats,
        "parity": manifest.parity.model_dump(include={"max_abs_err", "min_cosine", "cases"}),
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"load average (1 min) before/after: {load_before[0]:.1f} / {load_after[0]:.1f} on {os.cpu_count()} cores")
    print(f"\nparity (manifest): max abs err {manifest.parity.max_abs_err:.3g}, "
          f"min cosine {manifest.parity.min_cosine:.7f}")
    print(f"wrote {out}")
    return 0
