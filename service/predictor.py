"""The predictor between HTTP and the runtime (as segment-anything's ``SamPredictor``): embed an
image once, then answer features at a density, the similarity map of a point and matches, all on
numpy from the cache. Routes only parse, call this and encode; errors here are domain errors
(:class:`PredictionError`), which ``service.errors`` maps to HTTP.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Awaitable, Callable

import numpy as np
from lift_serve.service.cache import FeatureEntry
from lift_serve.service.features import FeatureService
from lift_serve.service.matching import mutual_nearest_neighbors, similarity_map

# cells_a * cells_b: matching builds a similarity matrix of 4 bytes per pair of cells
MAX_MATCH_PAIRS = 64_000_000


class PredictionError(ValueError):
    """The request cannot be answered as asked; ``code`` is stable, the message says what to do."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code
        self.message = message


@dataclasses.dataclass(frozen=True)
class Similarity:
    """Cosine similarity of one source cell with every cell of the target, clipped to [-1, 1]."""

    map: np.ndarray  # float32 [target grid_height, grid_width]
    cell: tuple[int, int]  # (row, col) of the queried source cell
    cell_center: tuple[float, float]  # its centre in the source's original pixels (x, y)
    source: FeatureEntry
    target: FeatureEntry


@dataclasses.dataclass(frozen=True)
class Matches:
    """Mutual nearest neighbours, best first, as cell centres in each ORIGINAL image's pixels."""

    points_a: np.ndarray  # float64 [N, 2] (x, y)
    points_b: np.ndarray
    scores: np.ndarray  # float64 [N], cosine in [-1, 1]
    a: FeatureEntry
    b: FeatureEntry


class DensePredictor:
    """Features, similarity and matches of images embedded through ``features`` (the cache and batchers)."""

    def __init__(self, features: FeatureService):
        self.features = features

    async def embed(self, data: bytes | None, fid: str | None, iterations: int | None = None,
                    stride: float | None = None,
                    is_gone: Callable[[], Awaitable[bool]] | None = None) -> FeatureEntry:
        """Features of an upload or a feature id at the density ``iterations`` or ``stride`` asks
        for (neither: the id's own, or the bundle's default for an upload); an id at another
        density costs only upsampler steps."""
        if fid:
            return await self.features.from_id(fid, iterations, stride, is_gone)
        return await self.features.from_upload(data, iterations, stride, is_gone)

    @staticmethod
    def similarity(source: FeatureEntry, x: float, y: float, target: FeatureEntry | None = None) -> Similarity:
        """Similarity of the cell under (x, y) (source's original pixels) with the target's cells."""
        target = target or source
        try:
            row, col = source.geometry.to_cell(x, y)
        except ValueError as exc:
            raise PredictionError("point_outside_image", str(exc)) from None
        sim = similarity_map(source.features[:, row, col], target.features, target.cell_norms)
        np.clip(sim, -1.0, 1.0, out=sim)
        if target is source:
            sim[row, col] = 1.0  # the exact value; the normalised dot product may round to 1 - 1e-7
        return Similarity(sim, (row, col), tuple(source.geometry.cell_center(row, col)), source, target)

    @staticmethod
    def matches(a: FeatureEntry, b: FeatureEntry, max_matches: int, min_score: float) -> Matches:
        """Mutual nearest neighbours between the cells whose centres lie on each image."""
        (ra, ca), (rb, cb) = a.geometry.content_grid, b.geometry.content_grid
        if ra * ca * rb * cb > MAX_MATCH_PAIRS:
            raise PredictionError("too_many_cells", f"{ra * ca} x {rb * cb} cells are too many to match at once; "
                                  "use fewer iterations or a larger stride")
        # Only cells whose centres lie on the image take part (keep_aspect pads the bottom/right).
        found = mutual_nearest_neighbors(a.features[:, :ra, :ca], b.features[:, :rb, :cb], max_matches, min_score)
        points_a = a.geometry.cell_centers(np.array([m.row_a for m in found]), np.array([m.col_a for m in found]))
        points_b = b.geometry.cell_centers(np.array([m.row_b for m in found]), np.array([m.col_b for m in found]))
        scores = np.clip(np.array([m.score for m in found], dtype=np.float64), -1.0, 1.0)  # rounding can exceed 1
        return Matches(np.asarray(points_a, np.float64).reshape(-1, 2), np.asarray(points_b, np.float64).reshape(-1, 2),
                       scores, a, b)
