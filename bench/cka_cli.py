"""`lift eval cka`: linear CKA of features across input scales (paper Fig. 4), bench/cka.py."""

from __future__ import annotations

import argparse

HELP = "scale invariance: linear CKA between features at input scales, backbone vs bilinear vs LiFT, JSON + plot"

DEFAULT_METHODS = "backbone,bilinear:1,lift:1"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from lift_serve.bench.eval_common import add_output_arguments, add_source_arguments

    parser.add_argument("--images", required=True, metavar="DIR", help="folder of photos (searched recursively)")
    parser.add_argument("--size", type=int, default=224, help="full-scale square side (default: %(default)s)")
    parser.add_argument("--scales", default="1,0.75,0.5",
                        help="input scales; 1 is the reference and always included (default: %(default)s)")
    parser.add_argument("--max-images", type=int, default=50, metavar="N",
                        help="use the first N photos in sorted order (default: %(default)s)")
    parser.add_argument("--methods", default=None,
                        help=f"comma-separated backbone, bilinear:k, lift:k (default: {DEFAULT_METHODS}; "
                             "without LiFT weights: backbone,bilinear:1)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_source_arguments(parser)
    add_output_arguments(parser, "runs/eval/cka.json")


def run(args: argparse.Namespace) -> int:
    from lift_serve.bench.cka import evaluate_cka
    from lift_serve.bench.eval_common import (
        EvalError,
        Method,
        check_size,
        finish_report,
        list_images,
        load_rgb,
        open_feature_source,
        parse_float_list,
        parse_methods,
        square_crop,
    )
    from lift_serve.bench.plots import plot_cka

    scales = parse_float_list(args.scales, "--scales")
    if args.max_images < 1:
        raise EvalError("--max-images must be >= 1")
    paths = list_images(args.images)[: args.max_images]
    source = open_feature_source(args)
    check_size(args.size, source.patch_size)
    has_lift = getattr(source, "lift", None) is not None or args.bundle is not None
    methods = parse_methods(args.methods or (DEFAULT_METHODS if has_lift else "backbone,bilinear:1"))
    images = [square_crop(load_rgb(p), args.size) for p in paths]
    results = evaluate_cka(images, {m: source.feature_fn(m) for m in methods}, scales, source.patch_size,
                           source.feature_fn(Method("backbone")), progress=not args.no_progress)
    report = {
        "eval": "cka",
        "config": {"images": str(args.images), "photos": len(images), "size": args.size, "scales": scales,
                   "methods": [m.name for m in methods]},
        "protocol": "features of each scale resampled to the method's scale-1 grid (self) or the backbone's "
                    "scale-1 grid (vs_backbone); cells of all photos pooled; linear CKA",
        "source": source.describe(),
        "results": results,
    }
    return finish_report(args, report, f"{format_table(results)}\n-> {args.out}", plot_cka)


def format_table(results: dict) -> str:
    """Markdown table: CKA per method (rows) and scale (columns), self and vs_backbone."""
    scales = list(results["input_sizes"])
    head = ("| method | " + " | ".join(f"self@{s}" for s in scales) + " | "
            + " | ".join(f"vs backbone@{s}" for s in scales) + " |")
    lines = [head, "|" + " --- |" * (1 + 2 * len(scales))]
    for name, entry in results.items():
        if name == "input_sizes":
            continue
        cells = [f"{entry['self'][s]:.3f}" for s in scales] + [f"{entry['vs_backbone'][s]:.3f}" for s in scales]
        lines.append(f"| {entry['label']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
