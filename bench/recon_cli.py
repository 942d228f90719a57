"""`lift eval recon`: Eq. 1 reconstruction distance of LiFT versus bilinear and nearest upsampling.

See ``bench.recon`` for the exact definitions of each number.
"""

from __future__ import annotations

import argparse

from lift_serve.model.options import add_backbone_arguments, backbone_spec_unless_sidecar, resolve_checkpoint_option

HELP = "reconstruction cosine distance (paper Eq. 1) of LiFT vs bilinear/nearest upsampling on held-out images"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", required=True, metavar="PATH",
                        help="our lift.safetensors (its sidecar names the backbone) or an authors' .pth "
                             "(then name the backbone with --backbone/--backbone-weights)")
    parser.add_argument("--data", required=True, metavar="DIR", help="held-out images, searched recursively")
    parser.add_argument("--imsize", type=int, default=None,
                        help="image side, a multiple of 4x the patch size (default: the checkpoint's "
                             "training size, else 448)")
    parser.add_argument("--downsample", default=None, choices=("stride", "antialias"),
                        help="how x/2 and x/4 are made (default: as in training, else stride)")
    parser.add_argument("--resize", default=None, choices=("squash", "crop"),
                        help="how images become squares (default: as the checkpoint was trained, else squash)")
    parser.add_argument("--batch-size", type=int, default=16, help="(default: %(default)s)")
    parser.add_argument("--max-images", type=int, default=None, help="use at most this many images")
    parser.add_argument("--device", default="auto", choices=("auto", "cuda", "cpu"))
    parser.add_argument("--out", default="runs/eval_recon.json", metavar="PATH",
                        help="JSON result (default: %(default)s)")
    add_backbone_arguments(parser)
    parser.set_defaults(backbone=None)  # None = take the backbone from the checkpoint's sidecar


def run(args: argparse.Namespace) -> int:
    import json
    from pathlib import Path

    import torch
    from lift_serve.bench.recon import ReconstructionMeter, format_table
    from lift_serve.model.extractor import Preprocessing
    from lift_serve.model.factory import load_backbone_and_lift
    from lift_serve.training.data import ImageFolderDataset, collate_images, scan_image_folder
    from lift_serve.training.trainer import TrainError, check_imsize_for_patch

    scan = scan_image_folder(args.data)  # fail on a bad folder before loading any model
    resolve_checkpoint_option(args)
    backbone, lift, meta = load_backbone_and_lift(backbone_spec_unless_sidecar(args), args.checkpoint)
    imsize = args.imsize or (meta.image_size if meta and meta.image_size else 448)
    check_imsize_for_patch(imsize, backbone.patch_size)
    downsample = args.downsample or ((meta.extra or {}).get("downsample") if meta else None) or "stride"
    # Checkpoints from before --resize existed were trained on centre crops.
    resize = args.resize or (((meta.extra or {}).get("resize", "crop")) if meta else None) or "squash"
    if args.batch_size < 1:
        raise TrainError(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.max_images is not None and args.max_images < 1:
        raise TrainError(f"--max-images must be >= 1, got {args.max_images}")
    device = torch.device("cuda" if args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
                          else "cpu")
    backbone.to(device)
    lift.to(device).eval()
    preprocessing = Preprocessing(backbone.mean, backbone.std, backbone.patch_size)
    paths = scan.paths[: args.max_images] if args.max_images else scan.paths
    loader = torch.utils.data.DataLoader(ImageFolderDataset(paths, imsize, resize=resize),
                                         batch_size=args.batch_size,
                                         collate_fn=collate_images)
    meter, skipped = ReconstructionMeter(), set(map(str, scan.unreadable))
    for images, bad in loader:
        meter.update(backbone, lift, preprocessing.normalize(images.to(device)), downsample)
        skipped.update(bad)
    result = meter.result() | {
        "metric": "cosine distance 1-cos per feature cell, mean; top-level = Eq. 1 = sum of the two octaves",
        "checkpoint": str(args.checkpoint), "data": str(args.data), "imsize": imsize,
        "downsample": downsample, "resize": resize, "backbone_spec": backbone.spec.to_dict(),
        "skipped_files": len(skipped),
    }
    print(f"{result['images']} images at {imsize}px, downsample {downsample}"
          + (f", {len(skipped)} unreadable files skipped" if skipped else ""))
    print(format_table(result))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(f"wrote {out}")
    return 0
