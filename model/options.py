"""Command-line options that describe a backbone and a LiFT checkpoint, shared by every command.

Torch-free on purpose: ``lift --help`` builds every parser, also in the torch-free API image.
"""

from __future__ import annotations

import argparse
import json

DEFAULT_BACKBONE = "vit_small_patch16_224.dino"


def add_backbone_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("backbone")
    group.add_argument("--backbone", default=DEFAULT_BACKBONE,
                       help="timm model name, optionally with a pretrained tag (default: %(default)s)")
    group.add_argument("--backbone-weights", default="hub", metavar="hub|random|PATH",
                       help="'hub' = timm pretrained weights (needs the Hugging Face hub or its cache), "
                            "'random' = untrained with --seed, or a timm/DINO weights file: a local path or "
                            "hf://ORG/NAME[@REVISION]/PATH (default: %(default)s)")
    group.add_argument("--seed", type=int, default=0, help="seed for random weights (default: %(default)s)")
    group.add_argument("--layer", type=int, default=-1,
                       help="block whose features are used; negative counts from the end (default: last)")
    group.add_argument("--facet", default=None, choices=("key", "query", "value", "token", "token_norm"),
                       help="which features of that block: query/key/value of its attention, its output "
                            "'token', or that through the final norm 'token_norm' (default: 'key' as the LiFT "
                            "authors for DINO v1 and other ViTs; 'token_norm' for DINOv2/DINOv3 names)")
    group.add_argument("--backbone-kwargs", default="{}", metavar="JSON",
                       help="extra timm.create_model arguments as JSON, e.g. '{\"depth\": 2}'")
    group.add_argument("--channel-layout", default=None, choices=("interleaved", "concatenated"),
                       help="channel order of a key/query/value facet: 'interleaved' = the LiFT authors' "
                            "(c = d*heads + h), 'concatenated' = timm's (c = h*head_dim + d). Default: the "
                            "checkpoint's layout, else interleaved")
    group.add_argument("--pos-interpolation", default="auto", choices=("auto", "dino", "timm"),
                       help="position-embedding resampling for other input sizes: 'dino' = DINO's own "
                            "rule, 'timm' = timm's; auto = dino for DINO v1 releases (.dino names, dino_*.pth "
                            "files), else timm (default: %(default)s)")


def add_checkpoint_argument(parser: argparse.ArgumentParser, required: bool = False) -> None:
    parser.add_argument("--checkpoint", required=required, default=None, metavar="PATH",
                        help="upsampler weights: our .safetensors (its .json sidecar names the backbone), the "
                             "LiFT authors' .pth or UPLiFT's released .safetensors (then --backbone names the "
                             "backbone); a local path or hf://ORG/NAME[@REVISION]/PATH")


def resolve_checkpoint_option(args: argparse.Namespace) -> None:
    """Replace an ``hf://`` ``--checkpoint`` by its file in the Hugging Face cache, with our ``.json``
    sidecar beside it when the repository has one (so the checkpoint reads as a local one)."""
    from lift_serve.hub.refs import is_hub_ref, resolve_file

    value = getattr(args, "checkpoint", None)
    if is_hub_ref(value):
        args.checkpoint = str(resolve_file(value, sidecar=True))


def backbone_spec_dict(args: argparse.Namespace) -> dict:
    """The BackboneSpec fields named on the command line."""
    try:
        kwargs = json.loads(args.backbone_kwargs)
    except json.JSONDecodeError as exc:
        raise OptionError(f"--backbone-kwargs is not valid JSON: {exc}") from None
    if not isinstance(kwargs, dict):
        raise OptionError("--backbone-kwargs must be a JSON object")
    return {"name": args.backbone, "weights": args.backbone_weights, "seed": args.seed,
            "layer": args.layer, "facet": args.facet, "model_kwargs": kwargs,
            "channel_layout": getattr(args, "channel_layout", None),
            "pos_interpolation": getattr(args, "pos_interpolation", "auto")}


def backbone_spec_unless_sidecar(args: argparse.Namespace):
    """For commands whose ``--backbone`` defaults to None: None when it is left out and ``--checkpoint``
    is our ``.safetensors`` (its sidecar names the backbone); otherwise the BackboneSpec of the
    backbone options, ``--backbone`` defaulting to DEFAULT_BACKBONE. Imports torch (via model.backbone)."""
    from pathlib import Path

    from lift_serve.model.backbone import BackboneSpec
    from lift_serve.model.checkpoint import is_ours

    checkpoint = None if args.checkpoint is None else Path(args.checkpoint)
    # ours (or missing, which the loader reports): the sidecar names the backbone. A .safetensors
    # file without a sidecar is an authors' file (UPLiFT's releases): it needs the backbone named.
    if args.backbone is None and checkpoint is not None and checkpoint.suffix == ".safetensors" \
            and (is_ours(checkpoint) or not checkpoint.exists()):
        return None
    return BackboneSpec.from_dict(backbone_spec_dict(args) | {"name": args.backbone or DEFAULT_BACKBONE})


class OptionError(ValueError):
    user_facing = True
