"""Warp-PCK: correspondence accuracy under known homographies, on any folder of photos.

Each pair is a photo (centre-cropped to ``size`` x ``size``) and a copy warped by a random
homography (rotation, zoom, translation, per-corner perspective jitter) with photometric jitter
(brightness, contrast, saturation). Because the warp is known, every source point has a true
target position, so any feature extractor can be scored without annotations.

Coordinate frame: continuous pixels, pixel ``(row i, col j)`` covering ``[j, j+1) x [i, i+1)`` and
centred at ``(j + 0.5, i + 0.5)`` -- the convention of Pillow's ``Image.transform``, which draws the
warped image. A feature cell ``(r, c)`` of stride ``s`` is represented by its centre
``((c + 0.5) s, (r + 0.5) s)``.

Two matchers, both on the method's own feature grids:

* ``dense_nn``: every source cell whose true target position lies inside the target image is
  matched to the target cell of highest cosine similarity;
* ``mutual_nn``: ``service.matching.mutual_nearest_neighbors``, the matcher the HTTP service's
  ``/v1/match`` uses; PCK is the share of its matches (whose true position is inside) that are correct.

A match is correct at threshold ``t`` when the distance between the predicted and the true target
position is ``<= t`` pixels. With the identity warp and no jitter every method scores 100 %.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from lift_serve.bench.eval_common import FeatureFn, Method, load_rgb, percent, square_crop

THRESHOLDS = (2.0, 4.0, 8.0, 16.0)
MATCHERS = ("dense_nn", "mutual_nn")


@dataclasses.dataclass(frozen=True)
class WarpConfig:
    """Ranges of the random warps; every parameter is drawn uniformly in ``[-max, +max]``.

    Attributes:
        max_rotation: degrees.
        max_scale: zoom factor drawn log-uniformly in ``[1/max_scale, max_scale]``.
        max_translation: fraction of the image side.
        max_perspective: per-corner displacement, fraction of the image side.
        photometric: brightness/contrast/saturation factors in ``[1 - p, 1 + p]``.
        identity: no warp and no jitter (a sanity check: every method must score 100 %).
    """

    max_rotation: float = 30.0
    max_scale: float = 1.3
    max_translation: float = 0.05
    max_perspective: float = 0.08
    photometric: float = 0.2
    identity: bool = False


@dataclasses.dataclass
class WarpPair:
    """source, target: uint8 [S, S, 3]; homography: [3, 3] source -> target continuous pixels."""

    image: str
    source: np.ndarray
    target: np.ndarray
    homography: np.ndarray


def homography_from_points(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """The [3, 3] homography (H[2,2] = 1) mapping four [4, 2] (x, y) points onto four others."""
    rows, rhs = [], []
    for (x, y), (u, v) in zip(np.asarray(src, float), np.asarray(dst, float), strict=True):
        rows.append([x, y, 1, 0, 0, 0, -u * x, -u * y])
        rows.append([0, 0, 0, x, y, 1, -v * x, -v * y])
        rhs += [u, v]
    h = np.linalg.solve(np.array(rows), np.array(rhs))
    return np.append(h, 1.0).reshape(3, 3)


def apply_homography(homography: np.ndarray, points: np.ndarray) -> np.ndarray:
    """[N, 2] (x, y) -> [N, 2] (x, y) under ``homography``."""
    points = np.asarray(points, dtype=np.float64).reshape(-1, 2)
    mapped = np.concatenate([points, np.ones((len(points), 1))], axis=1) @ homography.T
    return mapped[:, :2] / mapped[:, 2:3]


def sample_homography(rng: np.random.Generator, size: int, config: WarpConfig) -> np.ndarray:
    """A random [3, 3] homography of the ``size`` x ``size`` square about its centre."""
    if config.identity:
        return np.eye(3)
    corners = np.array([[0, 0], [size, 0], [size, size], [0, size]], dtype=np.float64)
    angle = math.radians(rng.uniform(-config.max_rotation, config.max_rotation))
    zoom = math.exp(rng.uniform(-math.log(config.max_scale), math.log(config.max_scale)))
    rotation = zoom * np.array([[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]])
    centre = np.array([size / 2, size / 2])
    shift = rng.uniform(-config.max_translation, config.max_translation, 2) * size
    moved = (corners - centre) @ rotation.T + centre + shift
    moved += rng.uniform(-config.max_perspective, config.max_perspective, (4, 2)) * size
    return homography_from_points(corners, moved)


def warp_image(image: np.ndarray, homography: np.ndarray) -> np.ndarray:
    """uint8 [S, S, 3] -> the same image seen through ``homography`` (black outside), [S, S, 3]."""
    from PIL import Image

    inverse = np.linalg.inv(homography)
    inverse = inverse / inverse[2, 2]  # Pillow wants the output -> input map with its last entry 1
    size = image.shape[1], image.shape[0]
    warped = Image.fromarray(image).transform(size, Image.Transform.PERSPECTIVE, tuple(inverse.reshape(-1)[:8]),
                                              Image.Resampling.BILINEAR)
    return np.asarray(warped, dtype=np.uint8)


def photometric_jitter(image: np.ndarray, rng: np.random.Generator, strength: float) -> np.ndarray:
    from PIL import Image, ImageEnhance

    picture = Image.fromarray(image)
    for enhancer in (ImageEnhance.Brightness, ImageEnhance.Contrast, ImageEnhance.Color):
        picture = enhancer(picture).enhance(float(rng.uniform(1 - strength, 1 + strength)))
    return np.asarray(picture, dtype=np.uint8)


def make_pairs(images: Sequence[Path], count: int, seed: int, size: int, config: WarpConfig) -> list[WarpPair]:
    """``count`` pairs; pair i uses photo ``i mod len(images)`` of a seeded shuffle and its own RNG
    stream ``(seed, i)``, so a pair does not change when ``count`` does."""
    order = np.random.default_rng(seed).permutation(len(images))
    pairs = []
    for index in range(count):
        rng = np.random.default_rng([seed, index])
        path = images[order[index % len(images)]]
        source = square_crop(load_rgb(path), size)
        homography = sample_homography(rng, size, config)
        target = warp_image(source, homography) if not config.identity else source.copy()
        if not config.identity and config.photometric > 0:
            target = photometric_jitter(target, rng, config.photometric)
        pairs.append(WarpPair(str(path), source, target, homography))
    return pairs


def cell_centres(height: int, width: int, stride: float) -> np.ndarray:
    """[height*width, 2] (x, y) centres of a feature grid's cells in row-major order."""
    rows, cols = np.mgrid[0:height, 0:width]
    return np.stack([(cols.ravel() + 0.5) * stride, (rows.ravel() + 0.5) * stride], axis=1)


def match_errors(features_a: np.ndarray, features_b: np.ndarray, homography: np.ndarray,
                 size: int) -> dict[str, np.ndarray]:
    """Pixel errors of both matchers for one pair.

    Args:
        features_a, features_b: [C, h, w] features of source and target (same grid size).
        homography: source -> target continuous pixels.
        size: image side S.

    Returns:
        ``{"dense_nn": [Na'], "mutual_nn": [M']}`` errors in target pixels of the matches whose true
        target position is inside the target image.
    """
    from lift_serve.service.matching import flatten_descriptors, mutual_matches

    _, ha, wa = features_a.shape
    _, hb, wb = features_b.shape
    centres_a = cell_centres(ha, wa, size / wa)
    centres_b = cell_centres(hb, wb, size / wb)
    truth = apply_homography(homography, centres_a)
    inside = np.all((truth >= 0) & (truth < size), axis=1)

    similarity = flatten_descriptors(features_a) @ flatten_descriptors(features_b).T  # [Na, Nb]
    predicted = centres_b[similarity.argmax(axis=1)]
    dense = np.linalg.norm(predicted - truth, axis=1)[inside]

    matches = mutual_matches(similarity, wa, wb)  # the same matrix: mutual_nearest_neighbors would rebuild it
    idx_a = np.array([m.row_a * wa + m.col_a for m in matches], dtype=np.int64)
    idx_b = np.array([m.row_b * wb + m.col_b for m in matches], dtype=np.int64)
    keep = inside[idx_a] if len(idx_a) else np.zeros(0, bool)
    mutual = np.linalg.norm(centres_b[idx_b[keep]] - truth[idx_a[keep]], axis=1) if keep.any() else np.zeros(0)
    return {"dense_nn": dense, "mutual_nn": mutual}


def evaluate_warp(pairs: Sequence[WarpPair], feature_fns: dict[Method, FeatureFn], size: int,
                  thresholds: Sequence[float] = THRESHOLDS, progress: bool = True) -> dict[str, Any]:
    """PCK (percent) per method and matcher, pooled over all pairs.

    Returns:
        ``{method.name: {"label", "grid": [h, w], "stride", matcher: {"points", "points_per_pair",
        "median_error", "pck@t": ...}}}``.
    """
    from tqdm import tqdm

    errors = {m: {k: [] for k in MATCHERS} for m in feature_fns}
    grids: dict[Method, tuple[int, int]] = {}
    steps = tqdm(total=len(pairs) * len(feature_fns), desc="warp pairs x methods", disable=not progress)
    for pair in pairs:
        for method, features in feature_fns.items():
            fa, fb = features(pair.source), features(pair.target)
            grids[method] = fa.shape[1:]
            for matcher, values in match_errors(fa, fb, pair.homography, size).items():
                errors[method][matcher].append(values)
            steps.update(1)
    steps.close()
    results = {}
    for method in feature_fns:
        h, w = grids.get(method, (0, 0))
        entry: dict[str, Any] = {"label": method.label, "grid": [int(h), int(w)],
                                 "stride": size / w if w else None}
        for matcher in MATCHERS:
            pooled = np.concatenate(errors[method][matcher]) if errors[method][matcher] else np.zeros(0)
            row = {"points": int(pooled.size), "points_per_pair": pooled.size / max(len(pairs), 1),
                   "median_error": float(np.median(pooled)) if pooled.size else None}
            row.update({f"pck@{t:g}px": percent(pooled <= t) for t in thresholds})
            entry[matcher] = row
        results[method.name] = entry
    return results
