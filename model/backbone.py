"""A frozen timm VisionTransformer that returns dense features of one block and facet.

Facets follow the usage of dense-ViT-feature work (and the LiFT authors, who use DINO's last-block
``key``): ``query``/``key``/``value`` are the thirds of ``attn.qkv(norm1(x))`` of the chosen block,
heads concatenated in timm's head-major channel order; ``token`` is that block's output.
Prefix tokens (CLS, registers) are dropped and the patch tokens are laid out as a map.

Weights come from one of three sources, recorded in :class:`BackboneSpec` so that training, export
and serving rebuild the identical network:

* ``hub``: timm's pretrained weights for ``name`` (needs the Hugging Face hub or its local cache);
* a path to a local file: a timm state dict (``.safetensors``/``.pth``) or an original DINO
  checkpoint (``teacher``/``student``/``module.``/``backbone.`` wrappers are unwrapped, and timm's
  own ``checkpoint_filter_fn`` maps the rest);
* ``random``: timm's initialisation under ``torch.manual_seed(seed)``; tests and demos use this.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

FACETS = ("key", "query", "value", "token")
DEFAULT_BACKBONE = "vit_small_patch16_224.dino"


class BackboneError(ValueError):
    """A backbone cannot be built as asked; the message says why and what to do."""

    user_facing = True


@dataclasses.dataclass
class BackboneSpec:
    """Everything needed to rebuild a backbone bit-for-bit.

    Attributes:
        name: timm model name, optionally with a pretrained tag (``vit_small_patch16_224.dino``).
        weights: ``"hub"``, ``"random"`` or a path to a local weights file.
        seed: RNG seed used when ``weights == "random"``.
        layer: block index whose features are returned; negative counts from the end (-1 = last).
        facet: one of ``key``, ``query``, ``value``, ``token``.
        model_kwargs: extra ``timm.create_model`` keyword arguments (e.g. ``depth`` and
            ``embed_dim`` for the tiny test models).
    """

    name: str = DEFAULT_BACKBONE
    weights: str = "hub"
    seed: int = 0
    layer: int = -1
    facet: str = "key"
    model_kwargs: dict[str, Any] = dataclasses.field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> BackboneSpec:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise BackboneError(f"unknown backbone fields {sorted(unknown)}; expected a subset of {sorted(known)}")
        return cls(**data)


def _create_timm_model(spec: BackboneSpec, pretrained: bool) -> nn.Module:
    import timm

    kwargs = dict(spec.model_kwargs)
    kwargs.setdefault("num_classes", 0)
    kwargs["dynamic_img_size"] = True
    try:
        return timm.create_model(spec.name, pretrained=pretrained, **kwargs)
    except RuntimeError as exc:
        if "Unknown model" in str(exc):
            raise BackboneError(f"timm has no model named {spec.name!r}: {exc}") from None
        raise
    except TypeError as exc:
        # timm passes every keyword to the model class: an unknown --backbone-kwargs entry, or a
        # model that is not a VisionTransformer (no dynamic_img_size), lands here.
        raise BackboneError(
            f"timm cannot build {spec.name!r} with arguments {kwargs}: {exc}. The backbone must be a timm "
            "VisionTransformer, and --backbone-kwargs may only hold arguments its constructor accepts"
        ) from None


def _unwrap_state_dict(obj: Any) -> dict[str, torch.Tensor]:
    """Find the ViT state dict inside a timm or original-DINO checkpoint."""
    for key in ("teacher", "model", "state_dict", "student"):
        if isinstance(obj, dict) and key in obj and isinstance(obj[key], dict):
            obj = obj[key]
            break
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise BackboneError("the weights file holds no state dict of tensors")
    state = {}
    for key, value in obj.items():
        for prefix in ("module.", "backbone."):
            key = key.removeprefix(prefix)
        if key.startswith("head."):
            continue  # classifier or DINO projection head: not part of the feature extractor
        state[key] = value
    return state


def load_weights_file(model: nn.Module, path: Path) -> None:
    """Load a local timm or DINO weights file into ``model``, or raise naming the mismatch."""
    from timm.models.vision_transformer import checkpoint_filter_fn

    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            raw = load_file(str(path))
        else:
            raw = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # pickle, zip and safetensors each raise their own types for a bad file
        raise BackboneError(
            f"cannot read backbone weights file {path} ({type(exc).__name__}: {str(exc)[:200]}); pass "
            "--backbone-weights with a timm state dict (.pth/.safetensors) or an original DINO checkpoint"
        ) from None
    state = checkpoint_filter_fn(_unwrap_state_dict(raw), model)
    state = {k: v for k, v in state.items() if not k.startswith("head.")}
    expected = model.state_dict()
    wrong = [f"{k}: expected {tuple(expected[k].shape)}, found {tuple(v.shape)}"
             for k, v in state.items() if k in expected and tuple(v.shape) != tuple(expected[k].shape)]
    if wrong:
        raise BackboneError(
            f"weights file {path} does not fit backbone {model.default_cfg.get('architecture')} "
            f"({len(wrong)} tensors differ in shape: {'; '.join(wrong[:4])}); check --backbone and "
            "--backbone-kwargs against the weights"
        )
    result = model.load_state_dict(state, strict=False)
    missing = [k for k in result.missing_keys if not k.startswith("head.")]
    if missing or result.unexpected_keys:
        raise BackboneError(
            f"weights file {path} does not fit backbone {model.default_cfg.get('architecture')}: "
            f"missing keys {missing[:8]}, unexpected keys {list(result.unexpected_keys)[:8]}"
        )


def build_vit(spec: BackboneSpec) -> nn.Module:
    """Create the timm ViT described by ``spec`` with its weights loaded."""
    if spec.weights == "random":
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(spec.seed)
            return _create_timm_model(spec, pretrained=False)
    if spec.weights == "hub":
        try:
            return _create_timm_model(spec, pretrained=True)
        except BackboneError:
            raise
        except Exception as exc:  # network, hub cache or auth failures surface as many types
            raise BackboneError(
                f"could not obtain pretrained weights for {spec.name!r} from the timm/Hugging Face hub "
                f"({type(exc).__name__}: {str(exc)[:200]}). Point at a local copy with "
                "--backbone-weights PATH (a timm state dict or the original DINO checkpoint), or "
                "pre-populate the Hugging Face cache (HF_HOME) on a machine with internet access."
            ) from None
    path = Path(os.path.expanduser(spec.weights))
    if not path.is_file():
        raise BackboneError(
            f"backbone weights file {path} does not exist; pass --backbone-weights with the path of "
            "a timm state dict or original DINO checkpoint, 'hub' for timm's pretrained weights, or "
            "'random' for an untrained network"
        )
    model = _create_timm_model(spec, pretrained=False)
    load_weights_file(model, path)
    return model


class ViTBackbone(nn.Module):
    """Frozen ViT returning ``[B, C, H/P, W/P]`` features of one block and facet.

    The network is kept in eval mode with gradients off: LiFT is always trained against a fixed
    backbone, and BatchNorm-free ViTs behave identically in eval mode.
    """

    def __init__(self, vit: nn.Module, spec: BackboneSpec):
        super().__init__()
        if spec.facet not in FACETS:
            raise BackboneError(f"facet must be one of {FACETS}, got {spec.facet!r}")
        depth = len(vit.blocks)
        if not -depth <= spec.layer < depth:
            raise BackboneError(f"layer {spec.layer} is out of range for a {depth}-block ViT")
        patch = vit.patch_embed.patch_size
        if patch[0] != patch[1]:
            raise BackboneError(f"only square patches are supported, got {patch}")
        self.vit = vit.eval().requires_grad_(False)
        self.spec = spec
        self.layer_index = spec.layer % depth
        self.facet = spec.facet
        self.patch_size = int(patch[0])
        self.embed_dim = int(vit.embed_dim)
        cfg = getattr(vit, "pretrained_cfg", None) or {}
        self.mean = tuple(float(v) for v in cfg.get("mean", (0.485, 0.456, 0.406)))
        self.std = tuple(float(v) for v in cfg.get("std", (0.229, 0.224, 0.225)))

    @classmethod
    def from_spec(cls, spec: BackboneSpec) -> ViTBackbone:
        return cls(build_vit(spec), spec)

    def train(self, mode: bool = True) -> ViTBackbone:
        # Always frozen: switching the parent module to train mode must not touch the ViT.
        super().train(False)
        return self

    def check_image_size(self, height: int, width: int) -> None:
        p = self.patch_size
        if height % p or width % p:
            raise ValueError(
                f"image sides must be multiples of the patch size {p}, got {height}x{width}; "
                f"resize or pad to {-(-height // p) * p}x{-(-width // p) * p}"
            )

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        """Dense features.

        Args:
            image: [B,3,H,W] normalised image, H and W multiples of the patch size P.

        Returns:
            [B,C,H/P,W/P] features of block ``layer_index`` and facet ``facet``.
        """
        b, _, h, w = image.shape
        if not torch.compiler.is_compiling() and isinstance(h, int):
            self.check_image_size(h, w)
        vit = self.vit
        x = vit.patch_embed(image)
        x = vit._pos_embed(x)
        x = vit.patch_drop(x)
        x = vit.norm_pre(x)
        for block in vit.blocks[: self.layer_index]:
            x = block(x)
        block = vit.blocks[self.layer_index]
        if self.facet == "token":
            x = block(x)
        else:
            qkv = block.attn.qkv(block.norm1(x))  # [B, N, 3*C], channels ordered (q|k|v, head, dim)
            third = ("query", "key", "value").index(self.facet)
            x = qkv[..., third * self.embed_dim : (third + 1) * self.embed_dim]
        x = x[:, vit.num_prefix_tokens :]
        return x.transpose(1, 2).reshape(b, self.embed_dim, h // self.patch_size, w // self.patch_size)
