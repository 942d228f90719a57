"""`lift eval spair`: SPair-71k keypoint PCK@{0.1, 0.05, 0.01} (see bench/spair.py for the protocol)."""

from __future__ import annotations

import argparse

HELP = "SPair-71k keypoint-correspondence PCK (the authors' protocol by default), JSON per category + plot"

PROTOCOL_TEXT = {
    "authors": "the LiFT authors' eval_spair.py: long side resized to size (Lanczos), centred zero padding "
               "to a square; features L2-normalised per cell, then bilinearly upsampled to the square, not "
               "renormalised; query row size*floor(y)+int(x); match = argmax of the dot product; correct if "
               "error < alpha * max side of the target box (resized); per category N pairs drawn with "
               "replacement (numpy RandomState(seed), categories sorted); overall = mean over categories",
    "cosine": "long side resized to size (Lanczos), centred zero padding to a square; features bilinearly "
              "upsampled to the square, then unit length per pixel; nearest target pixel by cosine; correct "
              "if error < alpha * max side of the target box (resized); --max-pairs sampled without "
              "replacement; overall = mean over categories",
}

MODES = ("backbone", "bilinear", "lift")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from lift_serve.bench.eval_common import add_output_arguments, add_source_arguments

    parser.add_argument("--root", required=True, metavar="SPAIR_DIR",
                        help="the SPair-71k folder holding PairAnnotation/ and JPEGImages/")
    parser.add_argument("--split", default="test", choices=("test", "val", "trn", "train"),
                        help="annotation split (default: %(default)s)")
    parser.add_argument("--size", type=int, default=224,
                        help="side of the padded square input, a multiple of the patch size (default: %(default)s)")
    parser.add_argument("--categories", nargs="+", default=None, metavar="CAT",
                        help="only these categories (default: all in the split)")
    parser.add_argument("--protocol", default="authors", choices=("authors", "cosine"),
                        help="'authors' = the LiFT authors' eval_spair.py step for step (the paper's numbers: "
                             "normalise cells, upsample, dot product; 100 pairs per category drawn with "
                             "replacement); 'cosine' = upsample, then cosine, all pairs (default: %(default)s)")
    parser.add_argument("--max-pairs", type=int, default=None, metavar="N",
                        help="pairs per category: authors = N draws with replacement (default 100, 0 = every "
                             "pair once); cosine = at most N, sampled without replacement (default: all)")
    parser.add_argument("--sample-seed", type=int, default=0, help="seed of the pair sampling (default: 0)")
    parser.add_argument("--mode", default="lift", choices=MODES,
                        help="backbone features, bilinear upsampling, or LiFT (default: %(default)s)")
    parser.add_argument("--lift-iterations", type=int, default=1, metavar="K",
                        help="2^K denser features for --mode bilinear/lift (default: %(default)s)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_source_arguments(parser)
    add_output_arguments(parser, "runs/eval/spair.json")


def run(args: argparse.Namespace) -> int:
    from lift_serve.bench.eval_common import EvalError, Method, check_size, finish_report, open_feature_source
    from lift_serve.bench.plots import plot_spair
    from lift_serve.bench.spair import ALPHAS, evaluate_spair, read_spair_pairs

    if args.lift_iterations < 1 and args.mode != "backbone":
        raise EvalError("--lift-iterations must be >= 1 for --mode bilinear or lift")
    method = Method("backbone", 0) if args.mode == "backbone" else Method(args.mode, args.lift_iterations)
    pairs = read_spair_pairs(args.root, args.split, args.categories, args.max_pairs, args.sample_seed,
                             args.protocol)
    source = open_feature_source(args)
    check_size(args.size, source.patch_size)
    results = evaluate_spair(pairs, source.feature_fn(method), args.size, ALPHAS, progress=not args.no_progress,
                             protocol=args.protocol)
    report = {
        "eval": "spair",
        "config": {"method": method.name, "label": method.label, "size": args.size, "split": args.split,
                   "protocol": args.protocol, "categories": args.categories, "max_pairs": args.max_pairs,
                   "sample_seed": args.sample_seed,
                   "alphas": list(ALPHAS), "root": str(args.root)},
        "protocol": args.protocol,
        "protocol_description": PROTOCOL_TEXT[args.protocol],
        "source": source.describe(),
        "results": results,
    }
    overall = results["overall"]
    summary = (f"{method.label} @ {args.size} ({args.protocol} protocol): "
               + " | ".join(f"PCK@{a}: {overall[f'pck@{a}']:.2f}" for a in ALPHAS)
               + f"  ({overall['categories']} categories, {overall['pairs']} pairs) -> {args.out}")
    return finish_report(args, report, summary, plot_spair)
