"""Build a DenseExtractor from a backbone spec and an optional LiFT checkpoint: the one factory
that training, export and evaluation share, so all three rebuild the same network."""

from __future__ import annotations

from pathlib import Path

from model.backbone import BackboneSpec, ViTBackbone
from model.checkpoint import CheckpointError, CheckpointMeta, load_lift_checkpoint
from model.extractor import DenseExtractor
from model.lift import LiFT


def load_backbone_and_lift(
    spec: BackboneSpec | None, checkpoint: str | Path | None
) -> tuple[ViTBackbone, LiFT | None, CheckpointMeta | None]:
    """Rebuild the backbone and load LiFT.

    With our checkpoint and ``spec=None`` the backbone comes from the checkpoint's sidecar. With an
    authors' ``.pth`` the spec is required (the state dict does not record it).
    """
    meta = None
    if checkpoint is not None and not Path(checkpoint).is_file():
        # Say so before reading a sidecar or building (maybe downloading) the backbone: otherwise the
        # user hears about a missing .json or the hub instead of the missing weights.
        raise CheckpointError(
            f"LiFT checkpoint {checkpoint} does not exist; train one with `lift train`, or download the "
            "authors' .pth for your backbone, and pass its path"
        )
    if checkpoint is not None and Path(checkpoint).suffix == ".safetensors":
        from model.checkpoint import read_checkpoint_meta

        meta = read_checkpoint_meta(checkpoint)
        if spec is None:
            spec = BackboneSpec.from_dict(meta.backbone)
    if spec is None:
        spec = BackboneSpec()
    backbone = ViTBackbone.from_spec(spec)
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
