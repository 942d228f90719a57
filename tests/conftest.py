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
    from lift_serve.model.backbone import BackboneSpec

    return BackboneSpec.from_dict(tiny_spec_dict())


@pytest.fixture(scope="session")
def tiny_backbone(tiny_spec):
    from lift_serve.model.backbone import ViTBackbone

    return ViTBackbone.from_spec(tiny_spec)


@pytest.fixture(scope="session")
def tiny_lift(tiny_backbone):
    import torch
    from lift_serve.model.lift import LiFT

    torch.manual_seed(0)
    return LiFT(tiny_backbone.embed_dim, tiny_backbone.patch_size).eval()


def make_tiny_bundle(out_dir, **kwargs):
    """Export the tiny backbone (``tiny_spec_dict()``) plus a LiFT seeded with 0 to ``out_dir``.

    The LiFT weights go through our checkpoint format (``<out_dir>_lift.safetensors`` + sidecar) so
    the bundle is made by the same path as ``lift export --checkpoint``. Defaults: iterations
    (0, 1), sizes 64x64 and 64x96 (height x width); ``kwargs`` override ``export_bundle``'s.
    Returns the bundle directory.
    """
    from pathlib import Path

    import torch
    from lift_serve.model.backbone import BackboneSpec, ViTBackbone
    from lift_serve.model.checkpoint import CheckpointMeta, save_lift_checkpoint
    from lift_serve.model.export import export_bundle
    from lift_serve.model.lift import LiFT

    out_dir = Path(out_dir)
    spec = BackboneSpec.from_dict(tiny_spec_dict())
    backbone = ViTBackbone.from_spec(spec)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        lift = LiFT(backbone.embed_dim, backbone.patch_size).eval()
    meta = CheckpointMeta(backbone=spec.to_dict(), channels=backbone.embed_dim, patch_size=backbone.patch_size,
                          mean=list(backbone.mean), std=list(backbone.std))
    checkpoint = save_lift_checkpoint(out_dir.parent / f"{out_dir.name}_lift.safetensors", lift, meta)
    options = {"lift_iterations": (0, 1), "sizes": [(64, 64), (64, 96)]}
    options.update(kwargs)
    return export_bundle(out_dir, None, checkpoint, **options)


@pytest.fixture(scope="session")
def tiny_bundle(tmp_path_factory):
    """A bundle of the tiny ViT + seeded LiFT: iterations (0, 1), sizes 64x64 and 64x96 (fp32)."""
    return make_tiny_bundle(tmp_path_factory.mktemp("tiny_bundle") / "bundle")


@pytest.fixture(scope="module")
def runtime(tiny_bundle):
    """The tiny bundle opened with ONNX Runtime on the CPU (one per test module; modules that need
    another runtime define their own)."""
    from lift_serve.service.ort_runtime import BundleRuntime

    return BundleRuntime(tiny_bundle, providers="cpu")


@pytest.fixture(scope="module")
def client(tiny_bundle, runtime):
    """A started in-process app serving :func:`runtime` (batches run at once)."""
    from service_helpers import make_app, started_client

    with started_client(make_app(tiny_bundle, runtime, max_wait_ms=0)) as c:
        yield c
