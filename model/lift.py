"""The LiFT module (Suri, Walmer et al., ECCV 2024): 2x denser ViT features from features + image.

The submodule names and tensor shapes follow the authors' public implementation exactly, so their
released state dicts load into :class:`LiFT` unchanged (see ``model.checkpoint``):

* ``image_convs_1``: two stride-2 3x3 conv+BN+ReLU, 3 -> 32 -> 32 (image at stride 4)
* ``scale_adapter``: 2x2 max-pool for patch 16 (stride 8), identity for patch 8 (stride 4); in both
  cases this lands the image branch on the grid of the *output* (2x the ViT's patch grid)
* ``image_convs_2``: one stride-2 conv+BN+ReLU 32 -> 32 (image on the ViT's patch grid)
* ``up1``: transposed conv 2x2/2 on ``[features, image_convs_2]`` (C+32 -> (C+32)//2), then a
  DoubleConv on ``[that, scale_adapter output]`` -> C//2
* ``outc``: 1x1 conv C//2 -> C

For ``LiFT(384, 16)`` this is 1,187,280 trainable parameters, the paper's "1.2 M".

**Other patch sizes** (DINOv2's 14): the image branch's strides only fit 8 and 16, so for any other
patch size ``P`` the guide image (``[B,3,H,W]``, ``H = P*h``) is first resampled bilinearly
(half-pixel centres, no antialiasing) to ``[B,3,16h,16w]``, where the patch-16 branch (2x2 max
pool) lands on the 2x feature grid exactly. The weights are those of a patch-16 LiFT; the patch size
is part of the configuration (``config()``) and so recorded in every checkpoint and bundle. Patch 8
and 16 are untouched: bit-identical to the authors' module.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

NATIVE_PATCH_SIZES = (8, 16)  # the image branch's strides fit these; others resample the guide to 16
RESAMPLED_GUIDE_PATCH = 16
MAX_PATCH_SIZE = 64
IMAGE_BRANCH_CHANNELS = 32


def _conv_bn_relu(in_channels: int, out_channels: int, stride: int, bias: bool) -> list[nn.Module]:
    return [
        nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1, stride=stride, bias=bias),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    ]


class DoubleConv(nn.Module):
    """Two 3x3 conv (no bias) + BN + ReLU; state-dict keys ``double_conv.{0,1,3,4}``."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.double_conv = nn.Sequential(
            *_conv_bn_relu(in_channels, out_channels, stride=1, bias=False),
            *_conv_bn_relu(out_channels, out_channels, stride=1, bias=False),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.double_conv(x)


class Up(nn.Module):
    """Transposed-conv 2x upsampling, concatenation with the fine image branch, DoubleConv."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.up = nn.ConvTranspose2d(in_channels, in_channels // 2, kernel_size=2, stride=2)
        self.conv_1 = DoubleConv(in_channels // 2 + IMAGE_BRANCH_CHANNELS, out_channels)

    def forward(self, coarse: torch.Tensor, fine_image: torch.Tensor) -> torch.Tensor:
        return self.conv_1(torch.cat([self.up(coarse), fine_image], dim=1))


class LiFT(nn.Module):
    """Lightweight Feature Transform.

    Args:
        in_channels: C, the channel count of the ViT features it upsamples (384 for ViT-S).
        patch_size: P, the ViT's patch size; 8 or 16.
    """

    def __init__(self, in_channels: int, patch_size: int):
        super().__init__()
        if not 1 <= patch_size <= MAX_PATCH_SIZE:
            raise ValueError(f"LiFT needs a patch size between 1 and {MAX_PATCH_SIZE}, got {patch_size}")
        if in_channels < 2 or in_channels % 2:
            raise ValueError(f"LiFT needs an even channel count >= 2, got in_channels={in_channels}")
        self.in_channels = in_channels
        self.patch_size = patch_size
        c = IMAGE_BRANCH_CHANNELS
        self.up1 = Up(in_channels + c, in_channels // 2)
        self.outc = nn.Conv2d(in_channels // 2, in_channels, kernel_size=1)
        self.image_convs_1 = nn.Sequential(
            *_conv_bn_relu(3, c, stride=2, bias=True), *_conv_bn_relu(c, c, stride=2, bias=True)
        )
        # the patch size the image branch works at: the guide is resampled to it when it differs
        self.branch_patch = patch_size if patch_size in NATIVE_PATCH_SIZES else RESAMPLED_GUIDE_PATCH
        self.scale_adapter = nn.MaxPool2d(2, 2) if self.branch_patch == 16 else nn.Identity()
        self.image_convs_2 = nn.Sequential(*_conv_bn_relu(c, c, stride=2, bias=True))

    def check_inputs(self, image: torch.Tensor, features: torch.Tensor) -> None:
        """Raise ``ValueError`` naming the problem when shapes do not fit together."""
        p = self.patch_size
        if image.ndim != 4 or image.shape[1] != 3:
            raise ValueError(f"image must be [B,3,H,W], got {tuple(image.shape)}")
        if features.ndim != 4 or features.shape[1] != self.in_channels:
            raise ValueError(
                f"features must be [B,{self.in_channels},H/{p},W/{p}], got {tuple(features.shape)}"
            )
        h, w = image.shape[-2:]
        if h % p or w % p:
            raise ValueError(
                f"image sides must be multiples of the patch size {p}, got {h}x{w}; "
                f"resize or pad to {-(-h // p) * p}x{-(-w // p) * p}"
            )
        if tuple(features.shape[-2:]) != (h // p, w // p) or features.shape[0] != image.shape[0]:
            raise ValueError(
                f"features {tuple(features.shape)} do not belong to image {tuple(image.shape)}: "
                f"expected [{image.shape[0]},{self.in_channels},{h // p},{w // p}]"
            )

    def forward(self, image: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        """Upsample features 2x guided by the image.

        Args:
            image: [B,3,H,W] normalised image, H and W multiples of P.
            features: [B,C,H/P,W/P] ViT features of that image.

        Returns:
            [B,C,2H/P,2W/P] features.
        """
        if not torch.jit.is_tracing() and not torch.compiler.is_compiling():
            self.check_inputs(image, features)
        if self.branch_patch != self.patch_size:
            h, w = features.shape[-2:]
            image = F.interpolate(image, size=(h * self.branch_patch, w * self.branch_patch), mode="bilinear",
                                  align_corners=False, antialias=False)
        image_fine = self.scale_adapter(self.image_convs_1(image))  # [B,32,2H/P,2W/P]
        image_coarse = self.image_convs_2(image_fine)  # [B,32,H/P,W/P]
        x = self.up1(torch.cat([features, image_coarse], dim=1), image_fine)
        return self.outc(x)


    # -- the iterative-upsampler interface (model.upsampler) -----------------------------------------
    kind = "lift"

    def config(self) -> dict:
        """Constructor arguments: ``LiFT(**config())`` rebuilds the module (weights aside)."""
        return {"in_channels": self.in_channels, "patch_size": self.patch_size}

    @staticmethod
    def state_layout(patch_size: int) -> tuple[int, int, bool]:
        """The step state (the guide image): 3 channels, ``patch_size`` pixels a cell of the current grid."""
        return 3, patch_size, True

    def prepare(self, image: torch.Tensor) -> torch.Tensor:
        """Per-image state before the first step: the guide image of round 1, the normalised image."""
        return image

    def step(self, guide: torch.Tensor, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One round: features at twice the density, and the guide of the next round, the guide
        bilinearly doubled, as the authors apply LiFT repeatedly (each round's guide is the previous
        one upsampled, not the image resized anew)."""
        upsampled = self(guide, features)
        return F.interpolate(guide, scale_factor=2, mode="bilinear", align_corners=False), upsampled


def count_trainable_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad)
