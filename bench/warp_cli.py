"""`lift eval warp`: PCK under random known homographies on any folder of photos (bench/warp.py)."""

from __future__ import annotations

import argparse

HELP = "warp-PCK on any photos: random known homographies, service matcher and dense NN, JSON + plot"

DEFAULT_METHODS = "backbone,bilinear:1,lift:1,bilinear:2,lift:2"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from lift_serve.bench.eval_common import add_output_arguments, add_source_arguments

    parser.add_argument("--images", required=True, metavar="DIR", help="folder of photos (searched recursively)")
    parser.add_argument("--pairs", type=int, default=50, metavar="N", help="number of warped pairs (default: 50)")
    parser.add_argument("--size", type=int, default=224, help="square side of each image (default: 224)")
    parser.add_argument("--methods", default=None,
                        help=f"comma-separated backbone, bilinear:k, lift:k (default: {DEFAULT_METHODS}; "
                             "without LiFT weights: backbone,bilinear:1,bilinear:2)")
    parser.add_argument("--thresholds", default="2,4,8,16", help="pixel thresholds (default: %(default)s)")
    parser.add_argument("--max-rotation", type=float, default=30.0, help="degrees (default: %(default)s)")
    parser.add_argument("--max-scale", type=float, default=1.3, help="zoom in [1/s, s] (default: %(default)s)")
    parser.add_argument("--max-translation", type=float, default=0.05,
                        help="fraction of the side (default: %(default)s)")
    parser.add_argument("--max-perspective", type=float, default=0.08,
                        help="corner jitter, fraction of the side (default: %(default)s)")
    parser.add_argument("--photometric", type=float, default=0.2,
                        help="brightness/contrast/saturation jitter (default: %(default)s)")
    parser.add_argument("--identity", action="store_true", help="no warp, no jitter: a sanity check (100 %%)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_source_arguments(parser)
    # --seed (from the backbone options) also seeds the photo order, warps and jitter here;
    # --weights-seed separates the two when a random-weights backbone is evaluated.
    parser.add_argument("--weights-seed", type=int, default=None,
                        help="seed of random backbone weights if it must differ from --seed")
    add_output_arguments(parser, "runs/eval/warp.json")


def run(args: argparse.Namespace) -> int:
    import dataclasses

    from lift_serve.bench.eval_common import (
        EvalError,
        check_size,
        finish_report,
        list_images,
        open_feature_source,
        parse_float_list,
        parse_methods,
    )
    from lift_serve.bench.plots import plot_warp
    from lift_serve.bench.warp import WarpConfig, evaluate_warp, make_pairs

    if args.pairs < 1:
        raise EvalError("--pairs must be >= 1")
    if args.max_scale < 1:
        raise EvalError("--max-scale must be >= 1 (zoom is drawn in [1/s, s])")
    warp_seed = args.seed
    if args.weights_seed is not None:
        args.seed = args.weights_seed
    thresholds = parse_float_list(args.thresholds, "--thresholds")
    images = list_images(args.images)
    source = open_feature_source(args)
    check_size(args.size, source.patch_size)
    has_lift = getattr(source, "lift", None) is not None or args.bundle is not None
    methods = parse_methods(args.methods or (DEFAULT_METHODS if has_lift else "backbone,bilinear:1,bilinear:2"))
    config = WarpConfig(args.max_rotation, args.max_scale, args.max_translation, args.max_perspective,
                        args.photometric, args.identity)
    feature_fns = {m: source.feature_fn(m) for m in methods}
    pairs = make_pairs(images, args.pairs, warp_seed, args.size, config)
    results = evaluate_warp(pairs, feature_fns, args.size, thresholds, progress=not args.no_progress)
    report = {
        "eval": "warp",
        "config": {"images": str(args.images), "photos": len(images), "pairs": args.pairs, "seed": warp_seed,
                   "size": args.size, "thresholds_px": thresholds, "warp": dataclasses.asdict(config)},
        "protocol": "PCK = share of matches within t pixels of the true warped position (only points whose "
                    "true position is inside the target); dense_nn = every source cell to its most similar "
                    "target cell; mutual_nn = service.matching.mutual_nearest_neighbors",
        "source": source.describe(),
        "results": results,
    }
    return finish_report(args, report, f"{format_table(results, thresholds)}\n-> {args.out}", plot_warp)


def format_table(results: dict, thresholds) -> str:
    """Markdown table: one row per method and matcher."""
    head = "| method | matcher | points/pair | " + " | ".join(f"PCK@{t:g}px" for t in thresholds) + " |"
    lines = [head, "|" + " --- |" * (3 + len(thresholds))]
    for entry in results.values():
        for matcher in ("dense_nn", "mutual_nn"):
            row = entry[matcher]
            cells = " | ".join(f"{row[f'pck@{t:g}px']:.1f}" for t in thresholds)
            lines.append(f"| {entry['label']} | {matcher} | {row['points_per_pair']:.0f} | {cells} |")
    return "\n".join(lines)
