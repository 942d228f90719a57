"""Scale invariance of dense features by linear CKA (LiFT paper, Fig. 4).

For each photo (centre-cropped to ``size`` x ``size``) and each scale ``s``, the photo is resized
to ``round(s * size / P) * P`` pixels (P = patch size) and its features are computed. Features are
compared on a **common grid**: bilinearly resampled (antialiased when shrinking) to the grid the
method produces at scale 1. Cells of all photos are pooled into one ``[N, C]`` matrix per
(method, scale), and linear CKA (Kornblith et al., 2019) compares them:

* ``self``: method at scale ``s`` versus the same method at scale 1 -- how much the features
  change when the input shrinks (1 = not at all);
* ``vs_backbone``: method at scale ``s`` versus the *backbone* at scale 1, on the backbone's grid --
  e.g. does LiFT on a half-size image recover the full-size ViT features (LiFT's training target)?
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from lift_serve.bench.eval_common import FeatureFn, Method


def linear_cka(x: np.ndarray, y: np.ndarray) -> float:
    """Linear CKA of two representations of the same N items.

    Args:
        x: [N, C1]; y: [N, C2] (rows = items, e.g. feature-grid cells).

    Returns:
        ``||Yc^T Xc||_F^2 / (||Xc^T Xc||_F ||Yc^T Yc||_F)`` with column-centred Xc, Yc: 1 for
        representations equal up to rotation and isotropic scaling, near 0 for unrelated ones.
    """
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    if x.ndim != 2 or y.ndim != 2 or x.shape[0] != y.shape[0]:
        raise ValueError(f"CKA needs [N, C] arrays with the same N, got {x.shape} and {y.shape}")
    x = x - x.mean(axis=0)
    y = y - y.mean(axis=0)
    cross = np.linalg.norm(y.T @ x) ** 2
    norm = np.linalg.norm(x.T @ x) * np.linalg.norm(y.T @ y)
    return float(cross / norm) if norm > 0 else 0.0


def grid_rows(features: np.ndarray, grid: tuple[int, int]) -> np.ndarray:
    """[C, h, w] features resampled to ``grid`` -> [grid_h * grid_w, C] rows (row-major cells)."""
    import torch
    import torch.nn.functional as F

    tensor = torch.from_numpy(np.ascontiguousarray(features, dtype=np.float32))[None]
    if tuple(tensor.shape[2:]) != tuple(grid):
        shrink = tensor.shape[2] > grid[0] or tensor.shape[3] > grid[1]
        tensor = F.interpolate(tensor, size=grid, mode="bilinear", align_corners=False, antialias=shrink)
    return tensor[0].reshape(tensor.shape[1], -1).T.numpy()


def scaled_size(size: int, scale: float, patch_size: int) -> int:
    """Input side at ``scale``: nearest multiple of the patch size, at least one patch."""
    return max(patch_size, int(round(size * scale / patch_size)) * patch_size)


def resize_square(image: np.ndarray, side: int) -> np.ndarray:
    """uint8 [S, S, 3] -> uint8 [side, side, 3] (Lanczos)."""
    from PIL import Image

    if image.shape[0] == side:
        return image
    return np.asarray(Image.fromarray(image).resize((side, side), Image.Resampling.LANCZOS), dtype=np.uint8)


def evaluate_cka(images: Sequence[np.ndarray], feature_fns: dict[Method, FeatureFn], scales: Sequence[float],
                 patch_size: int, backbone_fn: FeatureFn, progress: bool = True) -> dict[str, Any]:
    """CKA per method and scale.

    Args:
        images: uint8 [S, S, 3] photos at full size.
        feature_fns: method -> feature function.
        scales: input scales; 1 is the reference and is always evaluated.
        patch_size: the ViT's patch size (scaled inputs are rounded to multiples of it).
        backbone_fn: the backbone's feature function (reference of ``vs_backbone``).

    Returns:
        ``{method.name: {"label", "grid": [h, w], "self": {scale: cka}, "vs_backbone": {scale: cka}}}``
        with scales as strings (JSON keys), plus ``"input_sizes": {scale: side}``.
    """
    from tqdm import tqdm

    size = images[0].shape[0]
    scales = sorted(set([1.0, *map(float, scales)]), reverse=True)
    sides = {s: scaled_size(size, s, patch_size) for s in scales}
    inputs = {s: [resize_square(im, sides[s]) for im in images] for s in scales}
    reference = [backbone_fn(im) for im in images]
    backbone_grid = reference[0].shape[1:]
    backbone_rows = np.concatenate([grid_rows(f, backbone_grid) for f in reference])
    results: dict[str, Any] = {"input_sizes": {f"{s:g}": sides[s] for s in scales}}
    steps = tqdm(total=len(feature_fns) * len(scales) * len(images), desc="CKA features", disable=not progress)
    for method, features in feature_fns.items():
        per_scale = {}
        for s in scales:
            per_scale[s] = [features(im) for im in inputs[s]]
            steps.update(len(images))
        grid = per_scale[1.0][0].shape[1:]
        full = np.concatenate([grid_rows(f, grid) for f in per_scale[1.0]])
        entry = {"label": method.label, "grid": [int(g) for g in grid], "self": {}, "vs_backbone": {}}
        for s in scales:
            rows = np.concatenate([grid_rows(f, grid) for f in per_scale[s]])
            entry["self"][f"{s:g}"] = linear_cka(rows, full)
            on_backbone = np.concatenate([grid_rows(f, backbone_grid) for f in per_scale[s]])
            entry["vs_backbone"][f"{s:g}"] = linear_cka(on_backbone, backbone_rows)
        results[method.name] = entry
    steps.close()
    return results
