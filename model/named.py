"""Named models on the torch side: the PyTorch extractor of a registry entry (``hubconf.py``) and
its bundle, exported once into the models cache (``lift export --model``, ``lift serve --model``).

The entries themselves are torch-free data in :mod:`lift_serve.hub.models`.
"""

from __future__ import annotations

import logging
from pathlib import Path

from lift_serve.hub.models import NamedModel, bundle_dir_for, resolve_checkpoint

logger = logging.getLogger("lift.models")


def backbone_spec(model: NamedModel, pretrained: bool = True):
    """The BackboneSpec of ``model``: its timm name and weights (random with ``pretrained=False``),
    the facet each family's upsampler was trained on (the family default)."""
    from lift_serve.model.backbone import BackboneSpec

    return BackboneSpec.from_dict({"name": model.backbone,
                                   "weights": model.backbone_weights if pretrained else "random",
                                   "model_kwargs": dict(model.backbone_kwargs)})


def _cached(out: Path) -> Path | None:
    from lift_serve.bundle import BundleError, read_manifest

    try:
        read_manifest(out)
    except BundleError:
        return None
    return out


def export_named(model: NamedModel, checkpoint: str | None = None, precision: str = "fp32",
                 out: str | Path | None = None) -> Path:
    """``model``'s bundle: the cached one when it exists (and ``out`` is not given), else exported
    (into the models cache, or ``out``). The weights file is resolved and hashed once."""
    from lift_serve.bundle.manifest import sha256_file
    from lift_serve.model.export import export_bundle

    path = resolve_checkpoint(model, checkpoint)
    if out is None:
        out = bundle_dir_for(model, sha256_file(path), precision)
        if _cached(out) is not None:
            logger.info("%s: using the bundle exported before, %s", model.name, out)
            return out
    logger.info("%s: exporting %s + %s (%s) to %s, once", model.name, model.backbone, model.upsampler, path, out)
    return export_bundle(out, backbone_spec(model), path, lift_iterations=model.iterations, sizes=model.sizes,
                         precision=precision, default_iterations=model.default_iterations)


def extractor(model: NamedModel, pretrained: bool = True, checkpoint: str | None = None,
              iterations: int | None = None, out_size: tuple[int, int] | None = None):
    """The PyTorch :class:`~lift_serve.model.extractor.DenseExtractor` of ``model`` (eval mode):
    pretrained backbone and released upsampler weights, or both random with ``pretrained=False``
    (nothing downloaded; for trying shapes)."""
    from lift_serve.model.backbone import build_backbone
    from lift_serve.model.checkpoint import load_lift_checkpoint
    from lift_serve.model.extractor import DenseExtractor
    from lift_serve.model.upsampler import build_upsampler

    backbone = build_backbone(backbone_spec(model, pretrained))
    if pretrained:
        upsampler, _ = load_lift_checkpoint(resolve_checkpoint(model, checkpoint), channels=backbone.embed_dim,
                                            patch_size=backbone.patch_size)
    else:
        upsampler = build_upsampler(model.upsampler, {"in_channels": backbone.embed_dim,
                                                      "patch_size": backbone.patch_size})
    steps = max(model.iterations) if iterations is None else iterations
    return DenseExtractor(backbone, upsampler.eval(), steps, out_size=out_size).eval()
