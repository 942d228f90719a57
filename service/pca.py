"""Dense features as colours: their first three principal components mapped to RGB.

What FeatUp, UPLiFT and the LiFT authors show first: regions the features consider alike get alike
colours, so one sees at a glance how sharp (or blocky) a density is. A :class:`PcaBasis` is fitted
on one image's features and can colour another image's, so that both are coloured comparably.

Choices (all deterministic, so the same features always give the same picture):

* the basis is fitted on at most :data:`FIT_CELLS` cells (an evenly spaced sample of the cells on
  the image: pixel-dense maps have 200 000 cells and the covariance would cost seconds), centred on
  their mean, by an eigen-decomposition of the ``C x C`` covariance;
* each component's sign is chosen so that its largest loading is positive;
* each component is mapped to [0, 255] between its 1st and 99th percentile over the fitted cells
  (clipped beyond), the same bounds for every image coloured with that basis.

Written with NumPy rather than scikit-learn: three lines of linear algebra do not justify a
dependency the service does not otherwise have.
"""

from __future__ import annotations

import dataclasses

import numpy as np
from lift_serve.service.geometry import ImageGeometry
from lift_serve.service.matching import channel_contract
from lift_serve.service.render import drawing_size
from PIL import Image

FIT_CELLS = 16384
COMPONENTS = 3


@dataclasses.dataclass(frozen=True)
class PcaBasis:
    """mean ``[C]``, components ``[3, C]``, per-component ``low``/``high`` colour bounds, and the
    share of the variance each component explains."""

    mean: np.ndarray
    components: np.ndarray
    low: np.ndarray
    high: np.ndarray
    explained: np.ndarray

    def project(self, features: np.ndarray) -> np.ndarray:
        """``[C, h, w]`` -> ``[h, w, 3]`` float32 component values."""
        # components . (x - mean) = components . x - components . mean: no centred copy of the features
        c, h, w = features.shape
        values = channel_contract(self.components, features.reshape(c, h * w)) - (self.components @ self.mean)[:, None]
        return values.T.reshape(h, w, COMPONENTS).astype(np.float32)

    def colours(self, features: np.ndarray) -> np.ndarray:
        """``[C, h, w]`` -> ``[h, w, 3]`` uint8 RGB."""
        values = (self.project(features) - self.low) / np.maximum(self.high - self.low, 1e-12)
        return np.clip(np.rint(values * 255.0), 0, 255).astype(np.uint8)

    def describe(self) -> dict:
        return {"mean": self.mean.tolist(), "components": self.components.tolist(), "low": self.low.tolist(),
                "high": self.high.tolist(), "explained_variance_ratio": self.explained.tolist()}


def _sample(features: np.ndarray, rows: int, cols: int) -> np.ndarray:
    """``[n, C]``: an evenly spaced sample of at most FIT_CELLS of the top-left ``rows x cols`` cells."""
    cells = features[:, :rows, :cols].reshape(features.shape[0], rows * cols).T
    if len(cells) <= FIT_CELLS:
        return cells.astype(np.float64)
    index = np.linspace(0, len(cells) - 1, FIT_CELLS).round().astype(np.int64)
    return cells[index].astype(np.float64)


def fit_basis(features: np.ndarray, content_grid: tuple[int, int]) -> PcaBasis:
    """The basis of ``[C, h, w]`` features, fitted on the cells of the image (``content_grid`` rows,
    cols: padding cells of ``keep_aspect`` are left out)."""
    sample = _sample(features, *content_grid)
    mean = sample.mean(axis=0)
    centred = sample - mean
    covariance = centred.T @ centred / max(1, len(centred) - 1)
    values, vectors = np.linalg.eigh(covariance)  # ascending
    order = np.argsort(values)[::-1][:COMPONENTS]
    components = vectors[:, order].T
    components *= np.where(components[np.arange(len(order)), np.abs(components).argmax(axis=1)] < 0, -1.0, 1.0)[:, None]
    if len(order) < COMPONENTS:  # fewer channels than components: the rest are zero
        components = np.vstack([components, np.zeros((COMPONENTS - len(order), components.shape[1]))])
    projected = centred @ components.T
    low, high = np.percentile(projected, 1, axis=0), np.percentile(projected, 99, axis=0)
    total = float(values.clip(min=0).sum()) or 1.0
    explained = np.zeros(COMPONENTS)
    explained[: len(order)] = values[order].clip(min=0) / total
    return PcaBasis(mean.astype(np.float32), components.astype(np.float32), low.astype(np.float32),
                    high.astype(np.float32), explained)


def pca_image(features: np.ndarray, geometry: ImageGeometry, basis: PcaBasis) -> Image.Image:
    """The RGB picture of ``features`` at the original image's (drawing) size: nearest cell, so that
    each cell's colour shows as a block (what the density really is), cropped to the image."""
    rgb = Image.fromarray(basis.colours(features), mode="RGB")
    return rgb.resize(drawing_size(geometry.width, geometry.height), Image.Resampling.NEAREST,
                      box=geometry.content_box)


def side_by_side(left: Image.Image, right: Image.Image, gap: int = 8) -> Image.Image:
    """Two pictures of one size next to each other on white."""
    canvas = Image.new("RGB", (left.width + gap + right.width, max(left.height, right.height)), "white")
    canvas.paste(left, (0, 0))
    canvas.paste(right, (left.width + gap, 0))
    return canvas
