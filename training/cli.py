"""`lift train`: train LiFT for a frozen ViT with the paper's self-supervised objective (Eq. 1).

Runs the same way alone or under ``torchrun --nproc_per_node N`` (DistributedDataParallel).
"""

from __future__ import annotations

import argparse
import os

from lift_serve.model.options import add_backbone_arguments, backbone_spec_dict

HELP = "train LiFT on a folder of images (self-supervised, paper Eq. 1); resumable, torchrun-ready"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", required=True, metavar="DIR",
                        help="folder of training images, searched recursively (jpg, jpeg, png, webp, bmp)")
    parser.add_argument("--out", default="runs/train", metavar="DIR",
                        help="where lift.safetensors/.json, resume.pt, log.jsonl and loss.png go "
                             "(default: %(default)s)")
    parser.add_argument("--imsize", type=int, default=448,
                        help="training image side; a multiple of 4x the patch size (default: %(default)s)")
    parser.add_argument("--epochs", type=int, default=5, help="(default: %(default)s)")
    parser.add_argument("--batch-size", type=int, default=32, help="images per step per process (default: %(default)s)")
    parser.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate (default: %(default)s)")
    parser.add_argument("--max-steps", type=int, default=None,
                        help="stop after this many optimizer steps in total (smoke runs), or at --epochs if "
                             "that comes first; resuming with a larger value continues")
    parser.add_argument("--precision", default="fp32", choices=("fp32", "bf16", "fp16"),
                        help="autocast precision; fp16 (with loss scaling) needs CUDA (default: %(default)s)")
    parser.add_argument("--upsampler", default="lift", choices=("lift", "uplift"),
                        help="what to train: LiFT with Eq. 1 (default), or UPLiFT with its authors' multi-step "
                             "objective (see --uplift-levels)")
    parser.add_argument("--uplift-levels", type=int, default=2,
                        help="UPLiFT: pyramid levels S/2 ... S/2^N trained from, each run up to full density "
                             "(default: %(default)s; the authors: 3 for DINOv2-S/14, 2 for DINOv3-S+/16); "
                             "--imsize must be a multiple of 2^N x the patch size")
    parser.add_argument("--loss", default=None, choices=("cosine", "l1", "l2"),
                        help="distance: default cosine for LiFT (the paper's Eq. 1), l2 (mean squared error) "
                             "for UPLiFT (its authors)")
    parser.add_argument("--downsample", default="stride", choices=("stride", "antialias"),
                        help="how x/2 and x/4 are made: every second pixel (the authors) or an antialiased "
                             "resize (default: %(default)s)")
    parser.add_argument("--resize", default="squash", choices=("squash", "crop"),
                        help="how images become imsize x imsize squares: 'squash' = resize the whole image, "
                             "aspect ratio ignored (the authors' Resize((S, S))), 'crop' = shorter side to "
                             "imsize, centre crop (default: %(default)s)")
    parser.add_argument("--augment", action="store_true",
                        help="colour jitter 0.2 (brightness, contrast, saturation, hue), as the paper")
    parser.add_argument("--workers", type=int, default=4, help="data-loading processes per rank (default: %(default)s)")
    parser.add_argument("--save-every", type=int, default=1, metavar="EPOCHS",
                        help="write the checkpoint and resume state every this many epochs (default: %(default)s)")
    parser.add_argument("--save-every-steps", type=int, default=0, metavar="STEPS",
                        help="also save every this many steps; 0 = off (default: %(default)s)")
    parser.add_argument("--resume", action=argparse.BooleanOptionalAction, default=True,
                        help="continue from the resume state in --out if there is one (default: on)")
    parser.add_argument("--device", default="auto", choices=("auto", "cuda", "cpu"),
                        help="auto = CUDA when available (default: %(default)s)")
    parser.add_argument("--no-progress", dest="progress", action="store_false", help="no tqdm bars")
    add_backbone_arguments(parser)
    parser.epilog = ("--seed also seeds LiFT's initialisation, the data order and the colour jitter. "
                     "Under torchrun, --batch-size is per process and only rank 0 writes files.")


def config_from_args(args: argparse.Namespace):
    from lift_serve.training.trainer import TrainConfig

    return TrainConfig(
        data=args.data, out=args.out, backbone=backbone_spec_dict(args), imsize=args.imsize,
        epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, max_steps=args.max_steps,
        seed=args.seed, precision=args.precision, loss=args.loss, downsample=args.downsample,
        resize=args.resize, augment=args.augment, workers=args.workers, save_every=args.save_every,
        save_every_steps=args.save_every_steps, resume=args.resume, device=args.device,
        progress=args.progress, upsampler=args.upsampler, uplift_levels=args.uplift_levels)


def run(args: argparse.Namespace) -> int:
    from lift_serve.training.trainer import train

    result = train(config_from_args(args))
    if os.environ.get("RANK", "0") == "0":  # under torchrun only rank 0 reports
        print(result.checkpoint)
    return 0
