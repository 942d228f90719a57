"""Build a DenseExtractor from a backbone spec and an optional LiFT checkpoint: the one factory
that training, export and evaluation share, so all three rebuild the same network. Backbones come
from the backbone registry (``model.backbone.build_backbone``), upsamplers from the upsampler
registry (``model.upsampler``, through ``model.checkpoint``)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from lift_serve.model.backbone import QKV_FACETS, BackboneSpec, ViTBackbone, build_backbone, default_facet
from lift_serve.model.checkpoint import (
    AUTHORS_CHANNEL_LAYOUT,
    CheckpointError,
    CheckpointMeta,
    is_ours,
    load_lift_checkpoint,
    read_checkpoint_meta,
)
from lift_serve.model.extractor import DenseExtractor
from lift_serve.model.lift import LiFT


def load_backbone_and_lift(
    spec: BackboneSpec | None, checkpoint: str | Path | None
) -> tuple[ViTBackbone, LiFT | None, CheckpointMeta | None]:
    """Rebuild the backbone and load LiFT.

    With our checkpoint and ``spec=None`` the backbone comes from the checkpoint's sidecar. With an
    authors' ``.pth`` the spec is required (the state dict does not record it).

    A spec whose ``facet`` is None takes the checkpoint's (ours), else its family's default. A spec
    whose ``channel_layout`` is None takes the checkpoint's (the authors' ``.pth``:
    ``interleaved``; ours: its sidecar's); with no checkpoint, ``interleaved``. A LiFT trained on
    one layout of a query/key/value facet is never run on the other: that is a CheckpointError.
    """
    meta = None
    if checkpoint is not None and not Path(checkpoint).is_file():
        # Say so before reading a sidecar or building (maybe downloading) the backbone: otherwise the
        # user hears about a missing .json or the hub instead of the missing weights.
        raise CheckpointError(
            f"LiFT checkpoint {checkpoint} does not exist; train one with `lift train`, or download the "
            "authors' .pth for your backbone, and pass its path"
        )
    lift_layout = None
    if checkpoint is not None and is_ours(checkpoint):
        meta = read_checkpoint_meta(checkpoint)
        lift_layout = BackboneSpec.from_stored(meta.backbone).channel_layout
        if spec is None:
            spec = BackboneSpec.from_stored(meta.backbone)
    elif checkpoint is not None:
        lift_layout = AUTHORS_CHANNEL_LAYOUT
    if spec is None:
        spec = BackboneSpec()
    if spec.channel_layout is None:
        spec = dataclasses.replace(spec, channel_layout=lift_layout or BackboneSpec.channel_layout)
    if spec.facet is None:  # the checkpoint's facet, else the backbone family's default
        stored = BackboneSpec.from_stored(meta.backbone).facet if meta is not None else None
        spec = dataclasses.replace(spec, facet=stored or default_facet(spec.name))
    if lift_layout is not None and spec.facet in QKV_FACETS and spec.channel_layout != lift_layout:
        raise CheckpointError(
            f"LiFT checkpoint {checkpoint} was trained on {spec.facet} features in the "
            f"'{lift_layout}' channel layout, but the backbone is set to '{spec.channel_layout}'; its "
            f"input channels would be scrambled. Pass --channel-layout {lift_layout} (or leave it out)."
        )
    backbone = build_backbone(spec)
    lift = None
    if checkpoint is not None:
        lift, meta = load_lift_checkpoint(checkpoint, backbone.embed_dim, backbone.patch_size)
    return backbone, lift, meta


def build_extractor(
    spec: BackboneSpec | None,
    checkpoint: str | Path | None = None,
    lift_iterations: int = 1,
    upsample: str = "lift",
) -> DenseExtractor:
    backbone, lift, _ = load_backbone_and_lift(spec, checkpoint)
    if lift is None and upsample == "lift" and lift_iterations > 0 and checkpoint is None:
        lift_iterations = 0
    return DenseExtractor(backbone, lift, lift_iterations, upsample).eval()
