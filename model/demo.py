"""The demo bundle: a full-size ViT-S/16 with random weights and an untrained LiFT, so that the
service's speed and memory are real while its features are meaningless (``demo: true``)."""

from __future__ import annotations

import copy
import logging
import os
from pathlib import Path

import torch
from lift_serve.bundle import BundleError, read_manifest, sha256_file
from lift_serve.model.backbone import BackboneSpec, ViTBackbone
from lift_serve.model.lift import LiFT

logger = logging.getLogger("lift.export")

DEMO_SPEC = {"name": "vit_small_patch16_224", "weights": "random", "seed": 0, "layer": -1, "facet": "key",
             "model_kwargs": {}, "channel_layout": "interleaved", "pos_interpolation": "timm"}
DEMO_ITERATIONS = (0, 1)
DEMO_SIZES = ((224, 224), (448, 448))
DEMO_LIFT_SEED = 0


def _is_current_demo(out_dir: Path, sizes=None) -> bool:
    sizes = DEMO_SIZES if sizes is None else sizes
    try:
        manifest = read_manifest(out_dir)
    except BundleError:
        return False
    backbone = manifest.backbone
    same = (manifest.demo and backbone.timm_name == DEMO_SPEC["name"]
            and backbone.weights == "random" and backbone.seed == DEMO_SPEC["seed"]
            and backbone.model_kwargs == DEMO_SPEC["model_kwargs"]
            and backbone.channel_layout == DEMO_SPEC["channel_layout"]
            and manifest.iterations == list(DEMO_ITERATIONS)
            and [list(s) for s in manifest.input.sizes] == [list(s) for s in sizes])
    return same and all(
        (out_dir / g.file).is_file() and sha256_file(out_dir / g.file) == g.sha256
        for g in manifest.graph_files().values()
    )


def demo_modules() -> tuple[ViTBackbone, LiFT]:
    """The demo bundle's (backbone, LiFT): DEMO_SPEC and a LiFT initialised under DEMO_LIFT_SEED."""
    backbone = ViTBackbone.from_spec(BackboneSpec.from_dict(copy.deepcopy(DEMO_SPEC)))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(DEMO_LIFT_SEED)
        lift = LiFT(backbone.embed_dim, backbone.patch_size).eval()
    return backbone, lift


def export_demo_bundle(out_dir: str | Path, sizes=None) -> Path:
    """A demo bundle for trying the service without trained weights (``lift serve --demo``).

    Full-depth ViT-S/16 (``vit_small_patch16_224``, random weights, seed 0, key facet of the last
    block) and an untrained LiFT (``LiFT(384, 16)`` initialised under seed 0); densities 0 and 1;
    sizes 224 and 448 (``sizes``: another list, e.g. for a benchmark that needs every upload at one
    size). An existing valid demo bundle at ``out_dir`` (same recipe and sizes, graphs matching their
    sha256) is reused instead of exported again.
    """
    from lift_serve.model import export

    out_dir = Path(out_dir)
    sizes = DEMO_SIZES if sizes is None else sizes  # read at call time (tests change DEMO_SIZES)
    if _is_current_demo(out_dir, sizes):
        logger.info("reusing demo bundle at %s", out_dir)
        return out_dir
    backbone, lift = demo_modules()
    logger.info("exporting demo bundle to %s (about a minute on 2 CPU cores)", out_dir)
    return export.export_modules(out_dir, backbone, lift, DEMO_ITERATIONS, sizes, demo=True)


def default_demo_dir() -> Path:
    """Where ``lift serve --demo`` keeps its demo bundle: ``$LIFT_DEMO_DIR``, else
    ``~/.cache/lift-serve/demo-bundle`` (the same rule as the service's ``LIFT_DEMO_DIR`` setting)."""
    explicit = os.environ.get("LIFT_DEMO_DIR")
    if explicit:
        return Path(os.path.expanduser(explicit))
    return Path(os.path.expanduser("~")) / ".cache" / "lift-serve" / "demo-bundle"
