"""Dense descriptor matching in NumPy (no torch): mutual nearest neighbours and similarity maps.

Shared by the HTTP service and by ``lift eval warp`` so both measure the same matcher.
All feature maps are ``[C, H, W]`` arrays (channels first, one image); cells are addressed as
``(row, col)`` on that feature grid. Converting cells to image pixels is the job of the geometry
object that produced the model input (``service.geometry``), not of this module.
"""

from __future__ import annotations

import dataclasses

import numpy as np


@dataclasses.dataclass(frozen=True)
class CellMatch:
    """One mutual-nearest-neighbour match between feature cells.

    Attributes:
        row_a, col_a: cell in the first feature map.
        row_b, col_b: cell in the second feature map.
        score: cosine similarity of the two descriptors, in [-1, 1].
    """

    row_a: int
    col_a: int
    row_b: int
    col_b: int
    score: float


def l2_normalize(features: np.ndarray, axis: int = 0, eps: float = 1e-12) -> np.ndarray:
    """Unit-length descriptors along ``axis`` (float32)."""
    features = np.asarray(features, dtype=np.float32)
    norm = np.linalg.norm(features, axis=axis, keepdims=True)
    return features / np.maximum(norm, eps)


def flatten_descriptors(features: np.ndarray) -> np.ndarray:
    """[C, H, W] -> [H*W, C] unit-length descriptors in row-major cell order."""
    if features.ndim != 3:
        raise ValueError(f"features must be [C,H,W], got shape {features.shape}")
    c = features.shape[0]
    return l2_normalize(features.reshape(c, -1).T, axis=1)


def mutual_nearest_neighbors(
    features_a: np.ndarray,
    features_b: np.ndarray,
    max_matches: int | None = None,
    min_score: float = -1.0,
) -> list[CellMatch]:
    """Mutual nearest neighbours on L2-normalised descriptors, best score first.

    Args:
        features_a: [C, Ha, Wa] descriptors of image A.
        features_b: [C, Hb, Wb] descriptors of image B (same C).
        max_matches: keep at most this many (None = all).
        min_score: drop matches whose cosine similarity is below this.

    Returns:
        Matches sorted by descending score; ties keep row-major order of A.
    """
    if features_a.shape[0] != features_b.shape[0]:
        raise ValueError(f"channel mismatch: {features_a.shape[0]} vs {features_b.shape[0]}")
    similarity = flatten_descriptors(features_a) @ flatten_descriptors(features_b).T
    return mutual_matches(similarity, features_a.shape[2], features_b.shape[2], max_matches, min_score)


def mutual_matches(
    similarity: np.ndarray, width_a: int, width_b: int, max_matches: int | None = None, min_score: float = -1.0
) -> list[CellMatch]:
    """Mutual nearest neighbours from a precomputed cosine-similarity matrix.

    Args:
        similarity: [Ha*Wa, Hb*Wb] cosine similarities, cells in row-major order.
        width_a, width_b: Wa and Wb, to turn flat cell indices back into (row, col).
        max_matches, min_score: as :func:`mutual_nearest_neighbors`.
    """
    best_b = similarity.argmax(axis=1)
    best_a = similarity.argmax(axis=0)
    idx_a = np.nonzero(best_a[best_b] == np.arange(len(best_b)))[0]
    idx_b = best_b[idx_a]
    scores = similarity[idx_a, idx_b]
    keep = scores >= min_score
    idx_a, idx_b, scores = idx_a[keep], idx_b[keep], scores[keep]
    order = np.argsort(-scores, kind="stable")
    if max_matches is not None:
        order = order[:max_matches]
    return [
        CellMatch(int(idx_a[i] // width_a), int(idx_a[i] % width_a), int(idx_b[i] // width_b),
                  int(idx_b[i] % width_b), float(scores[i]))
        for i in order
    ]


CONTRACT_CHANNELS = 32  # channels widened to float32 at a time by channel_contract


def channel_contract(weights: np.ndarray, features: np.ndarray) -> np.ndarray:
    """``weights [..., C]`` times ``features [C, ...]`` summed over C, in float32. float16 features
    (a float16 bundle's cache) are widened a few channels at a time, so a click on a pixel-dense map
    never makes a float32 copy of all of it."""
    weights = np.asarray(weights, dtype=np.float32)
    axis = weights.ndim - 1
    if features.dtype == np.float32:
        return np.tensordot(weights, features, axes=(axis, 0))
    channels = features.shape[0]
    out = np.zeros(weights.shape[:-1] + features.shape[1:], np.float32)
    for start in range(0, channels, CONTRACT_CHANNELS):
        stop = start + CONTRACT_CHANNELS
        out += np.tensordot(weights[..., start:stop], features[start:stop].astype(np.float32), axes=(axis, 0))
    return out


def similarity_map(query: np.ndarray, features: np.ndarray, feature_norms: np.ndarray | None = None) -> np.ndarray:
    """Cosine similarity of one descriptor to every cell.

    Args:
        query: [C] descriptor.
        features: [C, H, W] descriptors.
        feature_norms: optional [H, W] L2 norms of ``features`` over C (:func:`cell_norms`), so that
            repeated queries on the same map skip normalising all of it.

    Returns:
        [H, W] float32 in [-1, 1].
    """
    q = l2_normalize(np.asarray(query, dtype=np.float32).reshape(-1), axis=0)
    if feature_norms is None:
        return np.tensordot(q, l2_normalize(features, axis=0), axes=(0, 0)).astype(np.float32)
    dots = channel_contract(q, features)
    return (dots / np.maximum(feature_norms, 1e-12)).astype(np.float32)


def cell_norms(features: np.ndarray) -> np.ndarray:
    """[C, H, W] -> [H, W] float32 L2 norms over channels (for :func:`similarity_map`)."""
    return np.linalg.norm(np.asarray(features, dtype=np.float32), axis=0)
