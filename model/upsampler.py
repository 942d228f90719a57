"""The upsampler registry: every upsampler is an ``nn.Module`` with one iterative interface, which
training, export and evaluation use through the one factory (``model.factory``).

Interface (what :class:`model.lift.LiFT` implements):

* ``kind``: the registry name, recorded in checkpoints and bundle manifests;
* ``config() -> dict``: constructor arguments, so ``UPSAMPLERS[kind](**config)`` rebuilds it;
* ``prepare(image) -> state``: once per image, from the normalised model-input image;
* ``step(state, features) -> (state, features)``: one round, features at twice the density;
* ``state_layout(patch_size) -> (channels, scale, follows_grid)``: the state's shape, for export.

Adding an upsampler is one new module plus one :func:`register_upsampler` line below; the exporter
writes its ``prepare`` and ``step`` as the bundle's two upsampler graphs.
"""

from __future__ import annotations

from lift_serve.model.lift import LiFT
from lift_serve.model.uplift import UPLiFT
from torch import nn

UPSAMPLERS: dict[str, type[nn.Module]] = {}


def register_upsampler(cls: type[nn.Module]) -> type[nn.Module]:
    for method in ("config", "prepare", "step", "state_layout"):
        if not callable(getattr(cls, method, None)):
            raise TypeError(f"upsampler {cls.__name__} lacks {method}()")
    UPSAMPLERS[cls.kind] = cls
    return cls


def build_upsampler(kind: str, config: dict) -> nn.Module:
    if kind not in UPSAMPLERS:
        raise ValueError(f"unknown upsampler kind {kind!r}; registered: {sorted(UPSAMPLERS)}")
    return UPSAMPLERS[kind](**config)


register_upsampler(LiFT)
register_upsampler(UPLiFT)
