"""`lift eval spair`: SPair-71k keypoint PCK@{0.1, 0.05, 0.01} (see bench/spair.py for the protocol)."""

from __future__ import annotations

import argparse

HELP = "SPair-71k keypoint-correspondence PCK (authors' protocol), JSON per category + plot"

MODES = ("backbone", "bilinear", "lift")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from bench.eval_common import add_output_arguments, add_source_arguments

    parser.add_argument("--root", required=True, metavar="SPAIR_DIR",
                        help="the SPair-71k folder holding PairAnnotation/ and JPEGImages/")
    parser.add_argument("--split", default="test", choices=("test", "val", "trn", "train"),
                        help="annotation split (default: %(default)s)")
    parser.add_argument("--size", type=int, default=224,
                        help="side of the padded square input, a multiple of the patch size (default: %(default)s)")
    parser.add_argument("--categories", nargs="+", default=None, metavar="CAT",
                        help="only these categories (default: all in the split)")
    parser.add_argument("--max-pairs", type=int, default=None, metavar="N",
                        help="at most N pairs per category, a seeded random sample (default: all)")
    parser.add_argument("--sample-seed", type=int, default=0, help="seed of the --max-pairs sample (default: 0)")
    parser.add_argument("--mode", default="lift", choices=MODES,
                        help="backbone features, bilinear upsampling, or LiFT (default: %(default)s)")
    parser.add_argument("--lift-iterations", type=int, default=1, metavar="K",
                        help="2^K denser features for --mode bilinear/lift (default: %(default)s)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_source_arguments(parser)
    add_output_arguments(parser, "runs/eval/spair.json")


def run(args: argparse.Namespace) -> int:
    from bench.eval_common import EvalError, Method, check_size, finish_report, open_feature_source
    from bench.plots import plot_spair
    from bench.spair import ALPHAS, evaluate_spair, read_spair_pairs

    if args.lift_iterations < 1 and args.mode != "backbone":
        raise EvalError("--lift-iterations must be >= 1 for --mode bilinear or lift")
    method = Method("backbone", 0) if args.mode == "backbone" else Method(args.mode, args.lift_iterations)
    pairs = read_spair_pairs(args.root, args.split, args.categories, args.max_pairs, args.sample_seed)
    source = open_feature_source(args)
    check_size(args.size, source.patch_size)
    results = evaluate_spair(pairs, source.feature_fn(method), args.size, ALPHAS, progress=not args.no_progress)
    report = {
        "eval": "spair",
        "config": {"method": method.name, "label": method.label, "size": args.size, "split": args.split,
                   "categories": args.categories, "max_pairs": args.max_pairs, "sample_seed": args.sample_seed,
                   "alphas": list(ALPHAS), "root": str(args.root)},
        "protocol": "long side resized to size (Lanczos), centred zero padding to a square; unit features "
                    "bilinearly upsampled to the square; nearest target pixel by cosine; correct if error < "
                    "alpha * max side of the target box (resized); overall = mean over categories",
        "source": source.describe(),
        "results": results,
    }
    overall = results["overall"]
    summary = (f"{method.label} @ {args.size}: " + " | ".join(f"PCK@{a}: {overall[f'pck@{a}']:.2f}" for a in ALPHAS)
               + f"  ({overall['categories']} categories, {overall['pairs']} pairs) -> {args.out}")
    return finish_report(args, report, summary, plot_spair)
