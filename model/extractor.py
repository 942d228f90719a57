"""Image -> dense features: backbone, then k rounds of LiFT (or a bilinear baseline).

Round i (i >= 1) of LiFT sees the image bilinearly upsampled by 2^(i-1) (the previous round's guide
doubled), as the authors apply it repeatedly, so round i maps features on a (2^(i-1) H/P) grid to a
(2^i H/P) grid. The upsampler is used through its iterative interface (``prepare`` once per image,
``step`` per round; see ``model.upsampler``), the same split the exported bundle has.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from lift_serve.model.backbone import ViTBackbone
from lift_serve.model.lift import LiFT
from lift_serve.model.uplift import resize_features
from torch import nn

UPSAMPLE_MODES = ("lift", "bilinear")


@dataclasses.dataclass(frozen=True)
class Preprocessing:
    """The numbers that turn pixels into model input; export and service read these, never guess.

    Attributes:
        mean, std: per-channel RGB statistics on the [0, 1] scale.
        multiple: input height and width must be multiples of this (the ViT patch size).
    """

    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    multiple: int

    def normalize(self, image: torch.Tensor) -> torch.Tensor:
        """[B,3,H,W] uint8 (0..255) or float (0..1) RGB -> normalised float32."""
        if image.dtype == torch.uint8:
            image = image.float() / 255.0
        mean = torch.tensor(self.mean, dtype=image.dtype, device=image.device).view(1, 3, 1, 1)
        std = torch.tensor(self.std, dtype=image.dtype, device=image.device).view(1, 3, 1, 1)
        return (image - mean) / std

    def check_size(self, height: int, width: int) -> None:
        m = self.multiple
        if height % m or width % m:
            raise ValueError(
                f"input sides must be multiples of {m}, got {height}x{width}; "
                f"resize or pad to {-(-height // m) * m}x{-(-width // m) * m}"
            )


class DenseExtractor(nn.Module):
    """Backbone features, optionally made denser.

    Args:
        backbone: the frozen ViT.
        lift: a LiFT module for this backbone, or None.
        lift_iterations: k; the output grid is 2^k times the patch grid. With ``lift=None`` and
            ``upsample="lift"``, k must be 0 (backbone only).
        upsample: ``"lift"`` (default) or ``"bilinear"``, the baseline that bilinearly resizes the
            backbone features to the same size LiFT would produce.
        out_size: an exact ``(height, width)`` feature grid: the k steps' output is then resized to
            it (bilinear, antialiased; the UPLiFT authors' ``outsize``), e.g. the image's own size
            for a patch-14 backbone, whose 4 steps give 16/14 cells a pixel. None = the steps' grid.
    """

    def __init__(
        self,
        backbone: ViTBackbone,
        lift: LiFT | None = None,
        lift_iterations: int = 1,
        upsample: str = "lift",
        out_size: tuple[int, int] | None = None,
    ):
        super().__init__()
        if out_size is not None and (len(out_size) != 2 or min(out_size) < 1):
            raise ValueError(f"out_size must be a (height, width) of positive ints, got {out_size!r}")
        if upsample not in UPSAMPLE_MODES:
            raise ValueError(f"upsample must be one of {UPSAMPLE_MODES}, got {upsample!r}")
        if lift_iterations < 0:
            raise ValueError(f"lift_iterations must be >= 0, got {lift_iterations}")
        if upsample == "lift" and lift is None:
            lift_iterations = 0
        if lift is not None and (lift.in_channels, lift.patch_size) != (backbone.embed_dim, backbone.patch_size):
            raise ValueError(
                f"LiFT({lift.in_channels}, {lift.patch_size}) does not fit the backbone "
                f"(channels {backbone.embed_dim}, patch {backbone.patch_size})"
            )
        self.backbone = backbone
        self.lift = lift
        self.lift_iterations = lift_iterations
        self.upsample = upsample
        self.out_size = None if out_size is None else (int(out_size[0]), int(out_size[1]))
        self.preprocessing = Preprocessing(backbone.mean, backbone.std, backbone.patch_size)

    @property
    def channels(self) -> int:
        return self.backbone.embed_dim

    @property
    def scale(self) -> int:
        """Output grid / patch grid."""
        return 2**self.lift_iterations

    @property
    def stride(self) -> float:
        """Input pixels per output feature cell."""
        return self.backbone.patch_size / self.scale

    def output_size(self, height: int, width: int) -> tuple[int, int]:
        if self.out_size is not None:
            return self.out_size
        p = self.backbone.patch_size
        return height // p * self.scale, width // p * self.scale

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        """[B,3,H,W] normalised image -> [B,C,2^k H/P, 2^k W/P] features (or ``out_size``)."""
        features = self.backbone(image)
        if self.lift_iterations and self.upsample == "bilinear":
            features = F.interpolate(features, scale_factor=self.scale, mode="bilinear", align_corners=False)
        elif self.lift_iterations:
            features = self.run_upsampler(image, features, self.lift_iterations)
        return features if self.out_size is None else resize_features(features, self.out_size)

    def run_upsampler(self, image: torch.Tensor, features: torch.Tensor, steps: int) -> torch.Tensor:
        """``steps`` upsampler rounds on backbone ``features`` of normalised ``image``: the chain the
        bundle's prepare and step graphs compute (``prepare`` once, then ``step`` k times)."""
        state = self.lift.prepare(image)
        for _ in range(steps):
            state, features = self.lift.step(state, features)
        return features
