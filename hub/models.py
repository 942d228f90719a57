"""Named models: a backbone from timm's hub plus an upsampler's weights, by one name
(``lift serve --model NAME``, ``lift export --model NAME``, ``lift models``, ``hubconf.py``).

Torch-free: only what defines each model. Building and exporting it is the torch side's
(:mod:`lift_serve.model.named`). An export is cached under a directory named by the sha256 of
everything that defines it (this entry, the upsampler file's own sha256, the precision and the
package version), so the second start reuses it at once and a changed definition never reuses a
stale bundle.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from pathlib import Path

from lift_serve import __version__


@dataclasses.dataclass(frozen=True)
class NamedModel:
    """One registry entry.

    Attributes:
        name: what users type.
        summary: one line for ``lift models``.
        backbone: timm name with its pretrained tag (weights from timm's hub, i.e. Hugging Face).
        upsampler: ``uplift`` or ``lift``.
        checkpoint: ``hf://`` reference to the upsampler's released weights, or None when the
            user must name the file (the LiFT authors publish theirs outside the Hub).
        iterations, sizes, default_iterations: what the exported bundle offers.
        licence: of the weights, as their publishers state it.
        checkpoint_sha256: the released file's sha256 when known (checked after download).
        backbone_weights: ``hub`` (timm's pretrained weights) or a file / ``hf://`` reference.
        backbone_kwargs: extra ``timm.create_model`` arguments (empty for the released backbones).
    """

    name: str
    summary: str
    backbone: str
    upsampler: str
    checkpoint: str | None
    iterations: tuple[int, ...]
    sizes: tuple[int, ...]
    default_iterations: int
    licence: str
    checkpoint_sha256: str | None = None
    backbone_weights: str = "hub"
    backbone_kwargs: tuple[tuple[str, object], ...] = ()

    @property
    def needs(self) -> str:
        """What a user must bring, in words."""
        parts = [f"the {self.backbone} weights from timm's hub (internet or a Hugging Face cache)"
                 if self.backbone_weights == "hub" else f"the backbone weights {self.backbone_weights}"]
        parts.append(f"the upsampler weights {self.checkpoint}" if self.checkpoint else
                     "the LiFT authors' checkpoint for this backbone: --checkpoint PATH or hf://ORG/NAME/FILE")
        return "; ".join(parts)

    def definition(self, checkpoint_sha256: str, precision: str) -> dict:
        return {**dataclasses.asdict(self), "checkpoint_file_sha256": checkpoint_sha256, "precision": precision,
                "lift_serve": __version__}


_UPLIFT_LICENCE = "UPLiFT weights: MIT (the authors' release); backbone: see its timm model card"
_LIFT_LICENCE = "LiFT weights: the LiFT authors' terms; DINO backbone: Apache-2.0"

REGISTRY: dict[str, NamedModel] = {m.name: m for m in [
    NamedModel("uplift-dinov2-s14", "UPLiFT on DINOv2 ViT-S/14, pixel-dense in 4 steps (the authors' weights)",
               "vit_small_patch14_dinov2.lvd142m", "uplift",
               "hf://UPLiFT-upsampler/uplift_dinov2-s14/uplift_dinov2-s14.safetensors",
               (0, 1, 2, 3, 4), (224,), 2, _UPLIFT_LICENCE),
    NamedModel("uplift-dinov3-splus16", "UPLiFT on DINOv3 ViT-S+/16, pixel-dense in 4 steps (the authors' weights)",
               "vit_small_plus_patch16_dinov3.lvd1689m", "uplift",
               "hf://UPLiFT-upsampler/uplift_dinov3-splus16/uplift_dinov3-splus16.safetensors",
               (0, 1, 2, 3, 4), (224,), 2, _UPLIFT_LICENCE),
    *[NamedModel(f"lift-dino-{short}", f"LiFT on DINO {title} (the LiFT authors' checkpoint, which you name)",
                 timm_name, "lift", None, (0, 1, 2), (224, 448), 1, _LIFT_LICENCE)
      for short, title, timm_name in [("vits16", "ViT-S/16", "vit_small_patch16_224.dino"),
                                      ("vits8", "ViT-S/8", "vit_small_patch8_224.dino"),
                                      ("vitb16", "ViT-B/16", "vit_base_patch16_224.dino"),
                                      ("vitb8", "ViT-B/8", "vit_base_patch8_224.dino")]],
]}


class UnknownModelError(KeyError):
    user_facing = True

    def __str__(self) -> str:
        return str(self.args[0])


def named_model(name: str) -> NamedModel:
    try:
        return REGISTRY[name]
    except KeyError:
        raise UnknownModelError(f"no model named {name!r}; `lift models` lists them: "
                                f"{', '.join(sorted(REGISTRY))}") from None


def models_cache_dir() -> Path:
    """Where named models' bundles are exported once (``LIFT_MODELS_CACHE``, default
    ``~/.cache/lift-serve/models``)."""
    return Path(os.environ.get("LIFT_MODELS_CACHE") or "~/.cache/lift-serve/models").expanduser()


def resolve_checkpoint(model: NamedModel, checkpoint: str | None = None) -> Path:
    """The local file of ``model``'s upsampler weights: ``checkpoint`` (a path or ``hf://``) if given,
    else the registry's release (fetched once into the Hugging Face cache), its sha256 checked when
    the registry records it."""
    from lift_serve.bundle.manifest import sha256_file
    from lift_serve.hub.refs import resolve_file

    ref = checkpoint or model.checkpoint
    if ref is None:
        raise UnknownModelError(f"{model.name} needs {model.needs.split('; ')[-1]}")
    path = resolve_file(ref, sidecar=True)
    if not path.is_file():
        raise UnknownModelError(f"{model.name}: checkpoint {path} does not exist")
    if checkpoint is None and model.checkpoint_sha256:
        found = sha256_file(path)
        if found != model.checkpoint_sha256:
            raise UnknownModelError(f"{model.name}: {path} has sha256 {found[:12]}…, the release's is "
                                    f"{model.checkpoint_sha256[:12]}…; delete it from the Hugging Face cache and retry")
    return path


def bundle_dir_for(model: NamedModel, checkpoint_sha256: str, precision: str = "fp32") -> Path:
    """The cache directory of ``model``'s bundle for this upsampler file and precision."""
    key = hashlib.sha256(json.dumps(model.definition(checkpoint_sha256, precision), sort_keys=True).encode())
    return models_cache_dir() / f"{model.name}-{precision}-{key.hexdigest()[:16]}"
