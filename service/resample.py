"""Feature maps at an exact grid size: separable antialiased bilinear resampling in NumPy.

The service answers an explicit ``stride`` by running the upsampler to the first density at least
as fine and resampling its ``[C, h, w]`` output to the asked grid. The filter is the one PyTorch's
``F.interpolate(mode="bilinear", antialias=True, align_corners=False)`` applies (Pillow's: a
triangle whose support widens with the downscale factor, weights renormalised at the borders), so
the service matches what :func:`lift_serve.model.uplift.resize_features` computes in PyTorch (and
the UPLiFT authors' ``outsize``) without importing torch.

Written here because no NumPy-level library offers that filter on a many-channel float array:
Pillow has it, but one single-channel ``F`` image per channel means hundreds of copies. Each output
row mixes only a few input rows (a band), so the weights are kept as ``(index, weight)`` taps per
output row instead of a dense matrix (a dense ``[out, in]`` matmul would cost 100x more at 512 px).
"""

from __future__ import annotations

import math

import numpy as np

# Channels resampled at a time: the temporaries stay a few MB (cache-sized), whatever the map.
CHANNEL_CHUNK = 8


def bilinear_taps(out_size: int, in_size: int) -> tuple[np.ndarray, np.ndarray]:
    """``(indices, weights)``, each ``[out_size, taps]``: output ``i`` = sum over taps of
    ``weights[i, t] * input[indices[i, t]]`` (unused taps have weight 0 and a valid index)."""
    if out_size < 1 or in_size < 1:
        raise ValueError(f"sizes must be positive, got {out_size} from {in_size}")
    scale = in_size / out_size
    support = max(scale, 1.0)  # the triangle's half-width, in input samples
    inverse = 1.0 / support
    taps = int(math.ceil(support)) * 2 + 1
    indices = np.zeros((out_size, taps), np.int64)
    weights = np.zeros((out_size, taps), np.float64)
    for i in range(out_size):
        centre = scale * (i + 0.5)
        first = max(int(centre - support + 0.5), 0)
        stop = min(int(centre + support + 0.5), in_size)
        j = np.arange(first, stop)
        w = np.clip(1.0 - np.abs((j - centre + 0.5) * inverse), 0.0, None)
        total = w.sum()
        indices[i, : len(j)] = j
        weights[i, : len(j)] = w / total if total > 0 else w
    return indices, weights


def _apply_taps(block: np.ndarray, axis: int, taps: tuple[np.ndarray, np.ndarray]) -> np.ndarray:
    indices, weights = taps
    shape = list(block.shape)
    shape[axis] = indices.shape[0]
    out = np.zeros(shape, np.float32)
    view = [1] * block.ndim
    view[axis] = indices.shape[0]
    for t in range(indices.shape[1]):
        w = weights[:, t]
        if w.any():
            gathered = np.take(block, indices[:, t], axis=axis)
            gathered *= w.astype(np.float32).reshape(view)
            out += gathered
    return out


def resample_features(features: np.ndarray, height: int, width: int) -> np.ndarray:
    """``[C, height, width]`` from ``[C, h, w]``; the array itself when the size already matches.

    Computed in float32 and returned in the input's precision when that is float16 (the cache
    keeps the bundle's precision), else float32. Both axes are done a few channels at a time
    (:data:`CHANNEL_CHUNK`), so the only full-size
    array made is the answer.
    """
    if features.ndim != 3:
        raise ValueError(f"features must be [C, h, w], got shape {list(features.shape)}")
    channels, h, w = features.shape
    if (h, w) == (height, width):
        return features
    rows = bilinear_taps(height, h) if h != height else None
    cols = bilinear_taps(width, w) if w != width else None
    out = np.empty((channels, height, width), np.float16 if features.dtype == np.float16 else np.float32)
    for start in range(0, channels, CHANNEL_CHUNK):
        block = features[start:start + CHANNEL_CHUNK].astype(np.float32, copy=False)
        if rows is not None:
            block = _apply_taps(block, 1, rows)
        if cols is not None:
            block = _apply_taps(block, 2, cols)
        out[start:start + CHANNEL_CHUNK] = block
    return out
