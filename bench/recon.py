"""Reconstruction evaluation: how well each upsampler predicts the backbone's own denser features.

For a held-out image x (resized and centre-cropped to ``imsize``, no augmentation) and the frozen
backbone F, each *octave* asks for the features of an image from those of its half-size version:

* ``x/2 -> x``: predict F(x) [C, S/P, S/P] from F(x/2) [C, S/2P, S/2P] (and x/2 for LiFT);
* ``x/4 -> x/2``: predict F(x/2) from F(x/4) (and x/4).

Methods, each scored by the cosine distance ``1 - cos`` per feature cell, averaged over cells and
images (the ``d`` of Eq. 1):

* ``lift``: LiFT(F(x/2), x/2), the checkpoint in eval mode (BatchNorm running statistics);
* ``bilinear``: F(x/2) bilinearly upsampled 2x (``align_corners=False``);
* ``nearest``: F(x/2) nearest-neighbour upsampled 2x (each coarse cell copied to its 2x2 cells);
* ``backbone`` (reference, not an upsampler): the backbone's low-resolution answer against its own
  high-resolution one *on the coarse grid*: F(x/2) versus F(x) 2x2-average-pooled. It tells how
  scale-consistent the backbone is, i.e. how much of the gap is due to resolution at all.

The headline value per method is Eq. 1 itself: the sum of its two octave distances (so it equals
the training loss with ``--loss cosine``); the per-octave values are reported too. Lower is better.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from lift_serve.training.objective import backbone_pyramid, cosine_distance_map

METHODS = ("lift", "bilinear", "nearest", "backbone")
OCTAVES = ("x/2->x", "x/4->x/2")


def _octave_distances(lift, guide, coarse, target) -> dict[str, torch.Tensor]:
    """Per-cell distances for one octave. guide [B,3,h,w]; coarse [B,C,h/P,w/P]; target [B,C,2h/P,2w/P]."""
    size = target.shape[-2:]
    return {
        "lift": cosine_distance_map(lift(guide, coarse), target),
        "bilinear": cosine_distance_map(F.interpolate(coarse, size=size, mode="bilinear", align_corners=False),
                                        target),
        "nearest": cosine_distance_map(F.interpolate(coarse, size=size, mode="nearest"), target),
        "backbone": cosine_distance_map(coarse, F.avg_pool2d(target, 2)),
    }


class ReconstructionMeter:
    """Accumulates per-cell cosine distances per octave and method over batches."""

    def __init__(self):
        self.sums = {o: dict.fromkeys(METHODS, 0.0) for o in OCTAVES}
        self.counts = {o: dict.fromkeys(METHODS, 0) for o in OCTAVES}
        self.images = 0

    @torch.no_grad()
    def update(self, backbone, lift, images: torch.Tensor, downsample: str = "stride") -> None:
        """images: [B,3,S,S] normalised, S a multiple of 4P."""
        half, quarter, full_f, half_f, quarter_f = backbone_pyramid(backbone, images, downsample)
        for octave, args in (("x/2->x", (half, half_f, full_f)), ("x/4->x/2", (quarter, quarter_f, half_f))):
            for method, distances in _octave_distances(lift, *args).items():
                self.sums[octave][method] += float(distances.sum())
                self.counts[octave][method] += distances.numel()
        self.images += images.shape[0]

    def result(self) -> dict:
        """{"lift": Eq1, "bilinear": ..., "nearest": ..., "backbone": ..., "octaves": {octave: {method: d}}}."""
        octaves = {o: {m: self.sums[o][m] / max(self.counts[o][m], 1) for m in METHODS} for o in OCTAVES}
        result = {m: sum(octaves[o][m] for o in OCTAVES) for m in METHODS}
        return result | {"octaves": octaves, "images": self.images}


def format_table(result: dict) -> str:
    """A plain-text table: one row per method, columns Eq. 1 and each octave."""
    header = f"{'method':<10} {'Eq. 1':>8} " + " ".join(f"{o:>10}" for o in OCTAVES)
    rows = [header, "-" * len(header)]
    for method in METHODS:
        cells = " ".join(f"{result['octaves'][o][method]:>10.4f}" for o in OCTAVES)
        note = "  (reference: F(x/2) vs pooled F(x))" if method == "backbone" else ""
        rows.append(f"{method:<10} {result[method]:>8.4f} {cells}{note}")
    return "\n".join(rows)
