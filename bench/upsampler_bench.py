"""`lift bench upsamplers`: CPU latency and peak memory of bilinear, LiFT and UPLiFT, one run.

For each ``--sizes`` side S, on a ViT backbone with random weights (``--backbone``, default DINOv3
ViT-S/16 as timm builds it; speed does not depend on the weights) and random LiFT / UPLiFT
weights, PyTorch eager on the CPU, batch 1, no gradients:

* ``backbone``: the backbone's features (stride 16), for scale;
* ``bilinear pixel-dense``: those features resized bilinearly to S x S;
* ``LiFT 2x`` (1 round) and ``LiFT pixel-dense`` (4 rounds, iterated as the LiFT authors do);
* ``UPLiFT 2x`` (1 step) and ``UPLiFT pixel-dense`` (4 steps, the encoder once);
* ``resample to stride 1``: what the service adds for ``stride=1`` on a patch-14 bundle, whose 4
  steps give 16/14 cells a pixel: its NumPy antialiased resampling of a ``[C, 16S/14, 16S/14]``
  map to ``S x S`` (``service/resample.py``).

Each is timed as the median of ``--repeats`` runs after one warm-up; latencies are also given as
ratios to ``LiFT 2x`` of the same size, measured in the same run (the machine is shared). Peak
memory is the growth of the process's peak resident set during one run of the case (Linux: the
peak is reset through ``/proc/self/clear_refs`` before each case). The upsamplers' time excludes
the backbone. JSON goes to ``--out``; a table is printed.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from lift_serve.bench.measure import median_seconds, status_mb
from lift_serve.bench.report import machine_facts, write_report

HELP = "CPU latency and peak memory of bilinear, LiFT and UPLiFT at 2x and pixel density"
DEFAULT_OUT = "runs/bench_upsamplers.json"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--sizes", default="224,448", help="image sides (default: %(default)s)")
    parser.add_argument("--backbone", default="vit_small_patch16_dinov3", help="timm name (patch 16)")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per case (default: %(default)s)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (default: 0 = torch's own)")
    parser.add_argument("--out", default=DEFAULT_OUT, help="JSON results (default: %(default)s)")


def _peak_growth_mb(work) -> float:
    """MB the peak resident set grew by while ``work()`` ran (NaN where the peak cannot be reset)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return float("nan")
    before = status_mb(field="VmRSS")
    work()
    return status_mb(field="VmHWM") - before


def _cases(backbone, lift, uplift, image) -> dict:
    """Name -> the work of one case on ``image`` (the backbone's features computed once here)."""
    import numpy as np
    import torch.nn.functional as F
    from lift_serve.service.resample import resample_features

    features = backbone(image)
    side = image.shape[-1]
    patch14_cells = side * 16 // 14
    patch14_dense = np.random.default_rng(side).standard_normal(
        (features.shape[1], patch14_cells, patch14_cells), dtype=np.float32)

    def lift_rounds(rounds: int):
        guide, x = lift.prepare(image), features
        for _ in range(rounds):
            guide, x = lift.step(guide, x)
        return x

    return {
        "backbone": lambda: backbone(image),
        "bilinear pixel-dense": lambda: F.interpolate(features, size=(side, side), mode="bilinear",
                                                      align_corners=False),
        "LiFT 2x": lambda: lift_rounds(1),
        "LiFT pixel-dense": lambda: lift_rounds(4),
        "UPLiFT 2x": lambda: uplift(image, features, 1),
        "UPLiFT pixel-dense": lambda: uplift(image, features, 4),
        "resample to stride 1": lambda: resample_features(patch14_dense, side, side),
    }


def _elements(result) -> int:
    return int(result.numel()) if hasattr(result, "numel") else int(result.size)  # tensor or ndarray


def run(args: argparse.Namespace) -> int:
    import torch

    threads = torch.get_num_threads()
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        with torch.no_grad():  # not set_grad_enabled: the command must leave the process as it found it
            return _measure(args)
    finally:
        torch.set_num_threads(threads)


def _measure(args: argparse.Namespace) -> int:
    import torch
    from lift_serve.model.backbone import BackboneSpec, build_backbone
    from lift_serve.model.lift import LiFT
    from lift_serve.model.uplift import UPLiFT

    backbone = build_backbone(BackboneSpec(name=args.backbone, weights="random", facet="token_norm"))
    if backbone.patch_size != 16:
        raise ValueError(f"--backbone must have patch 16 (4 steps = pixel density), got {backbone.patch_size}")
    channels = backbone.embed_dim
    torch.manual_seed(0)
    lift, uplift = LiFT(channels, 16).eval(), UPLiFT(channels, 16).eval()
    rows = []
    for side in (int(v) for v in args.sizes.split(",")):
        image = torch.randn(1, 3, side, side, generator=torch.Generator().manual_seed(side))
        cases = _cases(backbone, lift, uplift, image)
        print(f"{side} px ...", flush=True)
        timed = {name: median_seconds(work, args.repeats, warmup=True) for name, work in cases.items()}
        for name, work in cases.items():
            rows.append({"size": side, "case": name, "median_ms": 1000 * timed[name],
                         "ratio_to_lift_2x": timed[name] / timed["LiFT 2x"],
                         "peak_growth_mb": _peak_growth_mb(work),
                         "output_mb": _elements(work()) * 4 / 2**20})
    result = {"backbone": args.backbone, "channels": channels, "threads": torch.get_num_threads(),
              "repeats": args.repeats, "machine": machine_facts(), "rows": rows}
    lines = [f"{'size':>5} {'case':<22} {'ms':>9} {'x LiFT 2x':>9} {'peak MB':>8} {'output MB':>9}"]
    lines += [f"{r['size']:>5} {r['case']:<22} {r['median_ms']:9.1f} {r['ratio_to_lift_2x']:9.2f} "
              f"{r['peak_growth_mb']:8.0f} {r['output_mb']:9.0f}" for r in rows]
    write_report(result, args.out, "\n".join(lines))
    return 0
