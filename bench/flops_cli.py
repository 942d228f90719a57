"""`lift eval flops`: multiply-adds and parameters per configuration, next to PCK (bench/flops.py)."""

from __future__ import annotations

import argparse

HELP = "FLOPs (multiply-adds) and parameters of backbone / +LiFT / 2xLiFT at 224/448, next to PCK; JSON + plot"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from lift_serve.bench.eval_common import add_output_arguments

    parser.add_argument("--backbone", default="vit_small_patch16_224",
                        help="timm architecture; weights never load (meta tensors) (default: %(default)s)")
    parser.add_argument("--layer", type=int, default=-1, help="feature block (default: last)")
    parser.add_argument("--facet", default="key", choices=("key", "query", "value", "token"),
                        help="feature facet (default: %(default)s)")
    parser.add_argument("--backbone-kwargs", default="{}", metavar="JSON", help="extra timm.create_model arguments")
    parser.add_argument("--sizes", default="224,448", help="square input sides (default: %(default)s)")
    parser.add_argument("--methods", default="backbone,bilinear:1,lift:1,lift:2",
                        help="comma-separated backbone, bilinear:k, lift:k (default: %(default)s)")
    parser.add_argument("--pck", nargs="+", default=[], metavar="JSON",
                        help="results of `lift eval spair` or `lift eval warp` to put next to the FLOPs")
    parser.add_argument("--metric", default=None,
                        help="PCK field: pck@0.1 (SPair, default) or e.g. dense_nn/pck@8px (warp)")
    add_output_arguments(parser, "runs/eval/flops.json")


def run(args: argparse.Namespace) -> int:
    import json
    from pathlib import Path

    from lift_serve.bench.eval_common import EvalError, finish_report, parse_methods
    from lift_serve.bench.flops import FLOPS_SPEC, flops_table, pck_points
    from lift_serve.bench.plots import plot_flops

    try:
        sizes = [int(s) for s in args.sizes.split(",") if s.strip()]
        kwargs = json.loads(args.backbone_kwargs)
    except ValueError as exc:
        raise EvalError(f"--sizes takes integers and --backbone-kwargs a JSON object: {exc}") from None
    if not sizes or any(s <= 0 for s in sizes):
        raise EvalError(f"--sizes needs positive integers (multiples of the patch size), got {args.sizes!r}")
    methods = parse_methods(args.methods)
    spec = {**FLOPS_SPEC, "name": args.backbone, "layer": args.layer, "facet": args.facet, "model_kwargs": kwargs}
    try:
        rows = flops_table(spec, methods, sizes)
    except ValueError as exc:  # e.g. a size that is not a multiple of the patch size
        if getattr(exc, "user_facing", False):
            raise
        raise EvalError(str(exc)) from None
    metrics = []
    for path in args.pck:
        if not Path(path).is_file():
            raise EvalError(f"--pck file {path} does not exist")
        try:
            metric, points = pck_points(json.loads(Path(path).read_text()), args.metric)
        except (KeyError, json.JSONDecodeError) as exc:
            raise EvalError(f"{path}: {exc}") from None
        metrics.append(metric)
        for row in rows:
            if (row["method"], row["size"]) in points:
                row.setdefault("pck", {})[metric] = points[(row["method"], row["size"])]
    report = {
        "eval": "flops",
        "config": {"backbone": spec, "sizes": sizes, "methods": [m.name for m in methods], "pck_files": args.pck},
        "units": "gmacs = exact multiply-adds / 1e9 (the paper's 'GFLOPs' unit); flops = FlopCounterMode count "
                 "(2 per multiply-add); gmacs_thop = gmacs with transposed convs counted per output pixel as "
                 "the thop profiler does (reproduces the paper's LiFT cost); params in units",
        "rows": rows,
    }
    return finish_report(args, report, f"{format_table(rows, metrics)}\n-> {args.out}", plot_flops)


def format_table(rows: list[dict], metrics: list[str]) -> str:
    head = ("| configuration | size | params (M) | GMACs | + vs backbone | GMACs (thop) | + (thop) | "
            + " | ".join(metrics) + " |")
    lines = [head.replace(" |  |", " |"), "|" + " --- |" * (7 + len(metrics))]
    for row in rows:
        pck = [f"{row.get('pck', {}).get(m, float('nan')):.2f}" for m in metrics]
        cells = [row["label"], str(row["size"]), f"{row['params'] / 1e6:.2f}", f"{row['gmacs']:.2f}",
                 f"{100 * row['added_vs_backbone']:+.1f} %", f"{row['gmacs_thop']:.2f}",
                 f"{100 * row['added_vs_backbone_thop']:+.1f} %", *pck]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
