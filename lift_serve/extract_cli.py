"""`lift extract`: dense features of a folder of images into files, through the runtime (no HTTP)."""

from __future__ import annotations

import argparse

HELP = "features of a folder of images into .npy files or safetensors shards (batched, resumable)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--bundle", metavar="DIR", help="a bundle directory or hf://ORG/NAME[@REVISION][/PATH]")
    source.add_argument("--model", metavar="NAME", help="a named model (`lift models`), exported once if needed")
    parser.add_argument("--checkpoint", default=None, metavar="PATH",
                        help="with --model: the upsampler weights when the model has no release of its own")
    parser.add_argument("--images", required=True, metavar="DIR", help="folder of images, searched recursively")
    parser.add_argument("--out", required=True, metavar="DIR", help="where the features go (resumed if it exists)")
    density = parser.add_mutually_exclusive_group()
    density.add_argument("--iterations", type=int, default=None, help="upsampler steps (default: the bundle's)")
    density.add_argument("--stride", type=float, default=None, help="input pixels per cell, e.g. 1 (pixel-dense)")
    parser.add_argument("--dtype", choices=("float16", "float32"), default="float16",
                        help="stored precision (default: %(default)s)")
    parser.add_argument("--format", choices=("npy", "safetensors"), default="npy",
                        help="one .npy per image, or safetensors shards keyed by path (default: %(default)s)")
    parser.add_argument("--shard-size", type=int, default=256, help="images per safetensors shard (default: "
                        "%(default)s)")
    parser.add_argument("--batch-size", type=int, default=8, help="images per runtime call (default: %(default)s)")
    parser.add_argument("--resize-policy", choices=("square", "keep_aspect"), default="square",
                        help="as the service's LIFT_RESIZE_POLICY (default: %(default)s)")
    parser.add_argument("--providers", default="cuda,cpu", help="ONNX Runtime providers (default: %(default)s)")


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from tqdm import tqdm

    from lift_serve.hub.refs import resolve_directory
    from lift_serve.service.extract import ExtractOptions, Extractor, find_images
    from lift_serve.service.runtime import open_runtime

    if args.model:
        from lift_serve.serve_cli import named_model_bundle

        bundle = Path(named_model_bundle(args.model, args.checkpoint))
    else:
        bundle = resolve_directory(args.bundle)
    runtime = open_runtime(bundle, providers=args.providers)
    options = ExtractOptions(iterations=args.iterations, stride=args.stride, dtype=args.dtype, format=args.format,
                             shard_size=args.shard_size, batch_size=args.batch_size,
                             resize_policy=args.resize_policy)
    extractor = Extractor(runtime, Path(args.images), Path(args.out), options, str(args.model or args.bundle))
    total = len(find_images(Path(args.images)))
    with tqdm(total=total, initial=len(extractor.done()), unit="img", desc="extract") as bar:
        counts = extractor.run(progress=bar.update)
    print(f"{counts['written']} written, {counts['skipped_done']} already done, {counts['failed']} skipped as "
          f"unreadable (listed in {Path(args.out) / 'errors.jsonl'}); index: {Path(args.out) / 'index.jsonl'}")
    return 0
