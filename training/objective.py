"""The LiFT self-supervised objective (paper Eq. 1) and the distances it uses.

    L = d(F(x), LiFT(F(x/2), x/2)) + d(F(x/2), LiFT(F(x/4), x/4))

F is the frozen backbone (eval mode, no gradients); LiFT trains (BatchNorm in train mode). ``d`` is
the cosine distance ``1 - cos`` between feature vectors (the channel axis) at each cell, averaged
over cells and images; ``l1`` and ``l2`` (mean absolute / mean squared error) are the paper's
ablation alternatives.

Backbone passes: x, x/2 and x/4 have different sizes, so they cannot share one batch; instead the
whole batch goes through the backbone once per scale (three no-grad passes), and F(x/2) is computed
once and used twice (target of the first term, input of the second), instead of four passes.
The two LiFT passes run inside one module call (:class:`TwoOctaveLiFT`) so DistributedDataParallel
sees a single forward per backward.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

LOSSES = ("cosine", "l1", "l2")
DOWNSAMPLES = ("stride", "antialias")


def downsample(image: torch.Tensor, mode: str = "stride") -> torch.Tensor:
    """Halve [B,3,H,W] -> [B,3,H/2,W/2].

    ``stride`` keeps every second pixel (``x[..., ::2, ::2]``, the authors' choice; pixel (i, j) of
    the result is pixel (2i, 2j) of the input); ``antialias`` is an area-weighted bilinear resize.
    """
    if mode == "stride":
        return image[..., ::2, ::2]
    if mode == "antialias":
        return F.interpolate(image, scale_factor=0.5, mode="bilinear", antialias=True, align_corners=False)
    raise ValueError(f"downsample mode must be one of {DOWNSAMPLES}, got {mode!r}")


def feature_distance(prediction: torch.Tensor, target: torch.Tensor, loss: str = "cosine") -> torch.Tensor:
    """Mean distance between two [B,C,h,w] feature maps (scalar, float32).

    cosine: mean over cells of ``1 - cos(pred[:, :, i, j], target[:, :, i, j])``;
    l1 / l2: mean absolute / squared difference over all elements.
    """
    prediction, target = prediction.float(), target.float()
    if prediction.shape != target.shape:
        raise ValueError(f"prediction {tuple(prediction.shape)} and target {tuple(target.shape)} differ")
    if loss == "cosine":
        return (1.0 - F.cosine_similarity(prediction, target, dim=1, eps=1e-8)).mean()
    if loss == "l1":
        return (prediction - target).abs().mean()
    if loss == "l2":
        return (prediction - target).pow(2).mean()
    raise ValueError(f"loss must be one of {LOSSES}, got {loss!r}")


def cosine_distance_map(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """[B,C,h,w] x2 -> [B,h,w] per-cell cosine distance ``1 - cos`` (float32)."""
    return 1.0 - F.cosine_similarity(prediction.float(), target.float(), dim=1, eps=1e-8)


class TwoOctaveLiFT(nn.Module):
    """Runs LiFT on both octaves of Eq. 1 in one call (the module DDP wraps)."""

    def __init__(self, lift: nn.Module):
        super().__init__()
        self.lift = lift

    def forward(self, half: torch.Tensor, half_features: torch.Tensor, quarter: torch.Tensor,
                quarter_features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Args: x/2 [B,3,H/2,W/2], F(x/2) [B,C,H/2P,W/2P], x/4, F(x/4).
        Returns: predictions of F(x) [B,C,H/P,W/P] and of F(x/2) [B,C,H/2P,W/2P]."""
        return self.lift(half, half_features), self.lift(quarter, quarter_features)


@torch.no_grad()
def backbone_pyramid(backbone: nn.Module, image: torch.Tensor, mode: str = "stride"):
    """Frozen-backbone features at three scales.

    Args:
        image: [B,3,H,W] normalised, H and W multiples of 4P.
    Returns:
        (x/2, x/4, F(x), F(x/2), F(x/4)); features are [B,C,H/P,W/P], [B,C,H/2P,W/2P], [B,C,H/4P,W/4P].
    """
    half = downsample(image, mode)
    quarter = downsample(half, mode)
    return half, quarter, backbone(image), backbone(half), backbone(quarter)


def reconstruction_loss(
    backbone: nn.Module, lift_pair: nn.Module, image: torch.Tensor, loss: str = "cosine", mode: str = "stride"
) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
    """Eq. 1 for a batch of normalised images [B,3,H,W].

    Returns:
        (scalar loss with gradients into LiFT, (term x/2->x, term x/4->x/2) as detached scalars).
    """
    half, quarter, full_f, half_f, quarter_f = backbone_pyramid(backbone, image, mode)
    pred_full, pred_half = lift_pair(half, half_f, quarter, quarter_f)
    term_full = feature_distance(pred_full, full_f, loss)
    term_half = feature_distance(pred_half, half_f, loss)
    return term_full + term_half, (term_full.detach(), term_half.detach())


# -- UPLiFT's objective (its authors' training) ---------------------------------------------------------
def resized(image: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bilinear, antialiased, half-pixel centres: how the authors make each pyramid level from the
    full-size batch (torchvision's tensor resize)."""
    if tuple(image.shape[-2:]) == tuple(size):
        return image
    return F.interpolate(image, size=size, mode="bilinear", align_corners=False, antialias=True)


class MultiStepUpsampler(nn.Module):
    """Runs an iterative upsampler over every level of the UPLiFT objective in one call (the
    module DDP wraps): from level ``i``'s image and features, ``i`` steps, every step returned."""

    def __init__(self, upsampler: nn.Module):
        super().__init__()
        self.upsampler = upsampler

    def forward(self, images: list[torch.Tensor], features: list[torch.Tensor]) -> list[list[torch.Tensor]]:
        """``images[k]``/``features[k]``: the batch at 1/2^k scale and its backbone features.
        Returns, for each level ``i >= 1``, the ``i`` step outputs (densities 2x ... 2^i x)."""
        out = []
        for level in range(1, len(images)):
            state, x = self.upsampler.prepare(images[level]), features[level]
            steps = []
            for _ in range(level):
                state, x = self.upsampler.step(state, x)
                steps.append(x)
            out.append(steps)
        return out


def uplift_loss(backbone: nn.Module, model: nn.Module, image: torch.Tensor, levels: int, loss: str = "l2",
                ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
    """UPLiFT's objective for a batch of normalised images ``[B,3,S,S]``: the pyramid ``S/2^k``
    (k = 0..levels), each level resized from the full batch; from level ``i``'s image and
    features, ``i`` steps; step ``j``'s output is compared with the backbone's features of the level
    whose grid it has (level ``i - j``); all terms summed, weight 1 (the authors: MSE).

    Returns (loss, (sum of the one-step terms, sum of the multi-step terms)), the latter detached.
    """
    height, width = image.shape[-2:]
    images = [resized(image, (height // 2**k, width // 2**k)) for k in range(levels + 1)]
    with torch.no_grad():
        targets = [backbone(level) for level in images]
    one_step = multi_step = image.new_zeros((), dtype=torch.float32)
    for level, steps in enumerate(model(images, targets), start=1):
        for count, prediction in enumerate(steps, start=1):
            term = feature_distance(prediction, targets[level - count], loss)
            if count == 1:
                one_step = one_step + term
            else:
                multi_step = multi_step + term
    return one_step + multi_step, (one_step.detach(), multi_step.detach())
