"""Bounded LRU of computed features, by bytes: expensive once, a click later is a dot product.

Two kinds of entries share one budget:

* an :class:`Embedding` per image, keyed by :func:`embedding_key` (the SHA-256 of the uploaded bytes,
  resize policy, model input size): the backbone features and the uploaded file, everything the
  upsampler needs to produce *any* density without the backbone (its guide pixels are decoded from
  the file again when a new density is asked for: a decode costs less than an upsampler run, and
  holding them would take a sixth of a float16 entry's bytes);
* a :class:`FeatureEntry` per (image, density), keyed by its feature id (:func:`with_density`, the
  embedding key plus ``k<iterations>``, or ``k<iterations>s<stride>`` for an explicit stride): the
  features at that density as the runtime returned them (float32), resampled for an explicit
  stride, so a cache hit answers bit-identically to a miss.

A feature id names its image's embedding, so a request with an id and another ``iterations`` is
answered from the cached embedding with upsampler steps only.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import re
import threading
from collections import OrderedDict
from collections.abc import Callable

import numpy as np
from lift_serve.service.geometry import ImageGeometry
from lift_serve.service.matching import cell_norms


def content_hash(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def embedding_key(digest: str, geometry: ImageGeometry) -> str:
    """``<sha256 of the bytes, 32 hex>-<policy>-<H>x<W>``: one image as the model sees it."""
    policy = "sq" if geometry.policy == "square" else "ka"
    return f"{digest[:32]}-{policy}-{geometry.input_height}x{geometry.input_width}"


@dataclasses.dataclass(frozen=True)
class Density:
    """The grid a feature entry is on: ``iterations`` upsampler steps, then, when ``stride`` is set,
    resampled to exactly ``stride`` input pixels per cell (an explicit stride between the steps' own)."""

    iterations: int
    stride: float | None = None

    @property
    def label(self) -> str:
        """``k<iterations>`` or ``k<iterations>s<stride>``: the density part of a feature id."""
        return f"k{self.iterations}" if self.stride is None else f"k{self.iterations}s{self.stride:.10g}"


_DENSITY_LABEL = re.compile(r"k([0-9]{1,2})(?:s([0-9]{1,6}(?:\.[0-9]{1,10})?))?")


def parse_feature_id(fid: str) -> tuple[str, Density] | None:
    """``(embedding key, density)`` of a feature id, or None if it is not one."""
    parts = fid.split("-")
    found = _DENSITY_LABEL.fullmatch(parts[1]) if len(parts) == 4 else None
    if found is None:
        return None
    stride = float(found.group(2)) if found.group(2) else None
    if stride is not None and stride <= 0:
        return None
    return f"{parts[0]}-{parts[2]}-{parts[3]}", Density(int(found.group(1)), stride)


def key_input_size(key: str) -> tuple[int, int]:
    """``(height, width)`` of the model input an embedding key (or feature id) names."""
    height, width = key.rsplit("-", 1)[1].split("x")
    return int(height), int(width)


def with_density(key: str, density: Density) -> str:
    """The feature id of embedding ``key`` at ``density``:
    ``<sha256 of the bytes, 32 hex>-<density label>-<policy>-<H>x<W>``, stable across restarts."""
    digest, policy, size = key.split("-")
    return f"{digest}-{density.label}-{policy}-{size}"


@dataclasses.dataclass(frozen=True)
class Embedding:
    """One image's backbone pass: enough to produce features at any density later.

    Attributes:
        id: :func:`embedding_key`.
        coarse: ``[C, H/P, W/P]`` backbone features (the bundle's precision).
        geometry: how the original image maps onto the model input (stride = patch size).
        image_bytes: the uploaded file, kept to draw overlays and to make the upsampler's guide
            pixels again (re-decoded on demand).
    """

    id: str
    coarse: np.ndarray
    geometry: ImageGeometry
    image_bytes: bytes

    @property
    def nbytes(self) -> int:
        return int(self.coarse.nbytes) + len(self.image_bytes) + 1024


@dataclasses.dataclass(frozen=True)
class FeatureEntry:
    """Features of one uploaded image and what is needed to use them later.

    Attributes:
        id: the feature id (cache key).
        features: ``[C, grid_height, grid_width]``, float16 or float32 (the bundle's precision).
        geometry: how the original image maps onto the grid.
        density: upsampler steps run (``density.iterations``) and the explicit stride, if any.
        image_bytes: the uploaded file, kept to draw overlays later (re-decoded on demand); the same
            object as its embedding's, so it is counted there.
    """

    id: str
    features: np.ndarray
    geometry: ImageGeometry
    density: Density
    image_bytes: bytes

    @property
    def iterations(self) -> int:
        return self.density.iterations

    @functools.cached_property
    def cell_norms(self) -> np.ndarray:
        """``[grid_height, grid_width]`` descriptor norms, computed once so a click is one dot product."""
        return cell_norms(self.features)

    @functools.cached_property
    def pca_basis(self):
        """The PCA basis of these features (fitted once: the page colours a second image in the first
        one's basis, and redraws on every change of view)."""
        from lift_serve.service.pca import fit_basis

        return fit_basis(self.features, self.geometry.content_grid)

    @property
    def nbytes(self) -> int:
        # features + the float32 norms + rough object overhead (the file is counted with the embedding)
        cells = int(np.prod(self.features.shape[1:]))
        return int(self.features.nbytes) + 4 * cells + 1024


class FeatureCache:
    """Thread-safe LRU of :class:`Embedding` and :class:`FeatureEntry` objects bounded by their total ``nbytes``.

    Args:
        max_bytes: budget; 0 disables caching. An entry larger than the budget is not stored.
        on_hit, on_miss: called once per :meth:`get` outcome (metrics).
    """

    def __init__(self, max_bytes: int, on_hit: Callable[[], None] | None = None,
                 on_miss: Callable[[], None] | None = None):
        self.max_bytes = int(max_bytes)
        self._entries: OrderedDict[str, FeatureEntry | Embedding] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()
        self._on_hit = on_hit or (lambda: None)
        self._on_miss = on_miss or (lambda: None)

    def get(self, key: str, count: bool = True):
        """The entry under ``key`` (now the most recent), or None; ``count`` = report hit/miss."""
        with self._lock:
            entry = self._entries.get(key)
            if entry is not None:
                self._entries.move_to_end(key)
        if count:
            (self._on_hit if entry is not None else self._on_miss)()
        return entry

    def put(self, entry: FeatureEntry | Embedding) -> bool:
        """Store ``entry`` (most recent), evicting the least recently used; False if it cannot fit."""
        size = entry.nbytes
        if size > self.max_bytes:
            return False
        with self._lock:
            old = self._entries.pop(entry.id, None)
            if old is not None:
                self._bytes -= old.nbytes
            while self._entries and self._bytes + size > self.max_bytes:
                _, evicted = self._entries.popitem(last=False)
                self._bytes -= evicted.nbytes
            self._entries[entry.id] = entry
            self._bytes += size
        return True

    def __contains__(self, key: str) -> bool:
        with self._lock:
            return key in self._entries

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def bytes_used(self) -> int:
        return self._bytes
