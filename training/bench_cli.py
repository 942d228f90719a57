"""`lift bench train`: training throughput (images/s) of Eq. 1 steps on synthetic images.

Runs the trainer's own step (``training.trainer.TrainStep``: three no-grad backbone passes, two LiFT
passes, backward, Adam) on a fixed batch of random images, so no dataset and no data loading is
involved: the figure is the compute ceiling of training, not of a full run. After ``--warmup``
untimed steps, each of ``--steps`` steps is timed (with a CUDA synchronise on GPU). The backbone's
share is measured separately by timing the three no-grad backbone passes alone. The JSON also
records the machine's load average before and after, because on a shared CPU other processes skew
the result.
"""

from __future__ import annotations

import argparse

from lift_serve.model.options import add_backbone_arguments, backbone_spec_dict

HELP = "training throughput (images/s) for a backbone at an image size, on synthetic images; writes JSON"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--imsize", type=int, default=None,
                        help="image side (default: the smallest valid size from 224 up for the backbone: a "
                             "multiple of 4x its patch, e.g. 256 for patch 16, 224 for patch 14)")
    parser.add_argument("--batch-size", type=int, default=8, help="(default: %(default)s)")
    parser.add_argument("--steps", type=int, default=10, help="timed steps (default: %(default)s)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first (default: %(default)s)")
    parser.add_argument("--precision", default="fp32", choices=("fp32", "bf16", "fp16"))
    parser.add_argument("--loss", default="cosine", choices=("cosine", "l1", "l2"))
    parser.add_argument("--device", default="auto", choices=("auto", "cuda", "cpu"))
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--out", default="runs/bench_train.json", metavar="PATH",
                        help="JSON result (default: %(default)s)")
    add_backbone_arguments(parser)


def _timed(fn, device) -> float:
    import time

    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def run(args: argparse.Namespace) -> int:
    import json
    import os
    import platform
    import statistics
    import time
    from pathlib import Path

    import torch
    from lift_serve.model.extractor import Preprocessing
    from lift_serve.model.lift import count_trainable_parameters
    from lift_serve.training.config import smallest_imsize
    from lift_serve.training.objective import TwoOctaveLiFT, backbone_pyramid
    from lift_serve.training.trainer import TrainError, TrainStep, build_models

    if args.steps < 1 or args.warmup < 0 or args.batch_size < 1:
        raise TrainError("--steps and --batch-size must be >= 1 and --warmup >= 0")
    if args.threads is not None and args.threads < 1:
        raise TrainError(f"--threads must be >= 1 (or left out for torch's choice), got {args.threads}")
    if args.threads:
        torch.set_num_threads(args.threads)
    use_cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    if args.device == "cuda" and not torch.cuda.is_available():
        raise TrainError("--device cuda was asked for but no CUDA device is available; use --device cpu")
    device = torch.device("cuda" if use_cuda else "cpu")
    load_before = os.getloadavg()
    backbone, lift = build_models(backbone_spec_dict(args), args.imsize, args.seed)
    if args.imsize is None:
        args.imsize = smallest_imsize(224, backbone.patch_size)
    backbone.to(device)
    lift.to(device).train()
    preprocessing = Preprocessing(backbone.mean, backbone.std, backbone.patch_size)
    step = TrainStep(backbone, TwoOctaveLiFT(lift), preprocessing, 1e-3, args.precision, args.loss, "stride", device)
    generator = torch.Generator().manual_seed(args.seed)
    images = torch.rand(args.batch_size, 3, args.imsize, args.imsize, generator=generator).to(device)

    for _ in range(args.warmup):
        step(images)
    step_times = [_timed(lambda: step(images), device) for _ in range(args.steps)]
    normalized = preprocessing.normalize(images)
    with torch.autocast(device.type, dtype=torch.bfloat16 if args.precision == "bf16" else torch.float16,
                        enabled=args.precision != "fp32"):
        backbone_times = [_timed(lambda: backbone_pyramid(backbone, normalized), device) for _ in range(args.steps)]
    load_after = os.getloadavg()

    median = statistics.median(step_times)
    result = {
        "images_per_s": args.batch_size / median,
        "images_per_s_mean": args.batch_size * len(step_times) / sum(step_times),
        "step_seconds": {"median": median, "mean": statistics.fmean(step_times), "min": min(step_times),
                         "max": max(step_times)},
        "backbone_seconds_median": statistics.median(backbone_times),
        "backbone_share": statistics.median(backbone_times) / median,
        "backbone": backbone.spec.to_dict(), "imsize": args.imsize, "batch_size": args.batch_size,
        "steps": args.steps, "warmup": args.warmup, "precision": args.precision, "loss": args.loss,
        "lift_parameters": count_trainable_parameters(lift),
        "device": (torch.cuda.get_device_name(device) if use_cuda
                   else f"cpu ({platform.processor() or platform.machine()})"),
        "torch_threads": torch.get_num_threads(), "cpu_count": os.cpu_count(), "torch": torch.__version__,
        "loadavg_before": load_before, "loadavg_after": load_after,
        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(f"{args.backbone} ({backbone.spec.weights}) at {args.imsize}px, batch {args.batch_size}, "
          f"{args.precision} on {result['device']}, {result['torch_threads']} threads: "
          f"{result['images_per_s']:.1f} images/s (median step {median * 1000:.0f} ms, backbone "
          f"{result['backbone_share']:.0%} of it); load average {load_before[0]:.1f} -> {load_after[0]:.1f}")
    print(f"wrote {out}")
    return 0
