"""`lift export`: write an ONNX bundle (graphs + manifest.json) for the service.

Torch is imported only inside :func:`run`, so ``lift --help`` works without it.
"""

from __future__ import annotations

import argparse
import logging
import re
from pathlib import Path

from lift_serve.model.options import (
    OptionError,
    add_backbone_arguments,
    add_checkpoint_argument,
    backbone_spec_unless_sidecar,
    resolve_checkpoint_option,
)

HELP = "export backbone + LiFT to an ONNX bundle (backbone graph, upsampler graphs, manifest) with parity measured"
DEFAULT_OUT = "bundles/model"

_SIZE = re.compile(r"^\s*(\d+)\s*(?:[xX]\s*(\d+))?\s*$")


def parse_sizes(text: str) -> list[tuple[int, int]]:
    """``"224,448"`` -> squares ``[(224, 224), (448, 448)]``; ``"224x320"`` -> ``[(224, 320)]``
    (height x width). Raises OptionError on anything else."""
    sizes = []
    for part in text.split(","):
        match = _SIZE.match(part)
        if not match:
            raise OptionError(
                f"--sizes: cannot read {part.strip()!r}; give comma-separated sizes, each N (an N x N square) "
                "or HxW (height x width), e.g. --sizes 224,448 or --sizes 224x320"
            )
        height = int(match.group(1))
        width = int(match.group(2) or height)
        if height <= 0 or width <= 0:
            raise OptionError(f"--sizes: {part.strip()!r} must be positive")
        sizes.append((height, width))
    return sizes


def parse_iterations(text: str) -> list[int]:
    """``"0,1,2"`` -> ``[0, 1, 2]``."""
    problem = f"--lift-iterations must be comma-separated integers >= 0, e.g. 0,1,2; got {text!r}"
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise OptionError(problem) from None
    if not values or min(values) < 0:
        raise OptionError(problem)
    return values


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_backbone_arguments(parser)
    # No --backbone means: the sidecar of our checkpoint names it, else the default backbone.
    parser.set_defaults(backbone=None)
    for action in parser._actions:
        if action.dest == "backbone":
            action.help = ("timm model name, optionally with a pretrained tag (default: the one named in "
                           "the sidecar of a .safetensors --checkpoint, else vit_small_patch16_224.dino)")
    add_checkpoint_argument(parser)
    parser.add_argument("--model", default=None, metavar="NAME",
                        help="export a named model (`lift models`): its backbone, upsampler weights (or "
                             "--checkpoint for the LiFT models), densities and sizes; the backbone options and "
                             "--lift-iterations/--sizes are then the model's. Without --out it goes to the models "
                             "cache, reused when it is already there")
    parser.add_argument("--out", default=None, metavar="DIR",
                        help="bundle directory to write; an existing bundle there is replaced atomically "
                             f"(default: {DEFAULT_OUT}, or the models cache with --model)")
    parser.add_argument("--lift-iterations", default="1", metavar="K[,K...]",
                        help="densities the service offers, as LiFT rounds (0 = backbone features only, 1 = 2x denser, "
                             "2 = 4x); every value shares the one backbone graph and the one step graph, "
                             "applied k times. Example: 0,1,2 (default: %(default)s)")
    parser.add_argument("--default-iterations", type=int, default=None, metavar="K",
                        help="iterations the service uses when a request does not say (default: 1 if "
                             "exported, else the largest)")
    parser.add_argument("--sizes", default="224", metavar="SIZES",
                        help="input sizes the bundle supports, comma-separated; N is an N x N square, HxW is "
                             "height H by width W, e.g. 224,448 or 224x320. Each must be a multiple of the "
                             "patch size; each is verified against PyTorch (default: %(default)s)")
    parser.add_argument("--precision", choices=("fp32", "fp16"), default="fp32",
                        help="fp16 halves weights and activations (for GPUs; output float16); parity must "
                             "reach cosine 0.999 instead of 0.9999 (default: %(default)s)")
    parser.add_argument("--opset", type=int, default=None, help="ONNX opset (default: the exporter's)")
    parser.add_argument("--demo", action="store_true",
                        help="write the demo bundle instead (random ViT-S/16 + untrained LiFT, sizes 224 and "
                             "448, iterations 0,1); other model options are ignored")
    parser.add_argument("--push-to-hub", default=None, metavar="ORG/NAME",
                        help="after a successful export, publish the bundle on the Hugging Face Hub as this model "
                             "repository (as `lift push`; token from HF_TOKEN or `hf auth login`)")
    parser.add_argument("--private", action="store_true",
                        help="with --push-to-hub: create the repository private")


def _print_summary(out, manifest) -> None:
    """The bundle's files and its parity table (ONNX Runtime vs PyTorch fp32) on stdout."""
    backbone = manifest.backbone
    print(f"bundle written to {out} (format {manifest.format_version})")
    print(f"  backbone {backbone.timm_name} ({backbone.weights}), channels {manifest.output.channels}, "
          f"facet {backbone.facet} ({backbone.channel_layout}), position rule {backbone.pos_interpolation}, "
          f"precision {manifest.onnx.precision}, opset {manifest.onnx.opset}")
    upsampler = manifest.upsampler
    if upsampler is not None:
        detected = {"ours": "ours (.safetensors + .json sidecar)",
                    "authors": f"the authors' {upsampler.kind} file (no sidecar; kind told by its keys)"}
        print(f"  upsampler {upsampler.kind} {upsampler.parameters}, "
              f"densities {manifest.iterations} (default {manifest.default_iterations})")
        print(f"  checkpoint: {detected.get(upsampler.checkpoint_format, 'none')}; channel layout "
              f"{backbone.channel_layout}")
    if manifest.random_weights:
        print(f"  WARNING: random or untrained weights: {', '.join(manifest.random_weights)}; the service will say "
              "its features are meaningless")
    for role, graph in manifest.graph_files().items():
        size = (Path(out) / graph.file).stat().st_size
        print(f"  {graph.file:<24} {role:<18} {size / 1e6:8.1f} MB")
    print(f"  {'parity case':<22}{'stride':>7}  {'size':<10}{'batch':>6}  {'max abs err':>12}  {'min cosine':>13}")
    for case in manifest.parity.cases:
        name = case.graph if case.graph != "chain" else f"chain k={case.iterations}"
        size = f"{case.size[0]}x{case.size[1]}"
        print(f"  {name:<22}{manifest.stride(case.iterations):>7g}  {size:<10}{case.batch:>6}  "
              f"{case.max_abs_err:>12.3g}  {case.min_cosine:>13.9f}")


def run(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("lift").setLevel(logging.INFO)
    from lift_serve.bundle import read_manifest
    from lift_serve.model.demo import export_demo_bundle
    from lift_serve.model.export import export_bundle

    if args.demo and args.model:
        raise OptionError("--demo and --model exclude each other")
    if args.demo:
        out = export_demo_bundle(args.out or DEFAULT_OUT)
    elif args.model:
        from lift_serve.hub.models import named_model
        from lift_serve.model.named import export_named

        out = export_named(named_model(args.model), args.checkpoint, args.precision, args.out)
    else:
        resolve_checkpoint_option(args)
        out = export_bundle(
            args.out or DEFAULT_OUT, backbone_spec_unless_sidecar(args), args.checkpoint,
            lift_iterations=parse_iterations(args.lift_iterations),
            sizes=parse_sizes(args.sizes), precision=args.precision, opset=args.opset,
            default_iterations=args.default_iterations,
        )
    _print_summary(out, read_manifest(out))
    if args.push_to_hub:
        from lift_serve.hub.push_cli import push_and_report

        push_and_report(out, args.push_to_hub, private=args.private, after_export=True)
    return 0
