"""Shared fixtures: tiny randomly initialised timm ViTs and LiFT modules, built once per session.

The tiny backbone is a real timm VisionTransformer (2 blocks, 32 channels, patch 16) so every code
path that touches timm runs for real, but a forward pass costs milliseconds.
"""

from __future__ import annotations

import pytest

TINY_KWARGS = {"embed_dim": 32, "depth": 2, "num_heads": 2, "img_size": 64}


def tiny_spec_dict(patch_size: int = 16, **overrides) -> dict:
    name = "vit_tiny_patch16_224" if patch_size == 16 else "vit_small_patch8_224"
    spec = {"name": name, "weights": "random", "seed": 7, "layer": -1, "facet": "key",
            "model_kwargs": dict(TINY_KWARGS)}
    spec.update(overrides)
    return spec


@pytest.fixture(scope="session")
def tiny_spec():
    from model.backbone import BackboneSpec

    return BackboneSpec.from_dict(tiny_spec_dict())


@pytest.fixture(scope="session")
def tiny_backbone(tiny_spec):
    from model.backbone import ViTBackbone

    return ViTBackbone.from_spec(tiny_spec)


@pytest.fixture(scope="session")
def tiny_lift(tiny_backbone):
    import torch

    from model.lift import LiFT

    torch.manual_seed(0)
    return LiFT(tiny_backbone.embed_dim, tiny_backbone.patch_size).eval()
