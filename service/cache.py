"""Bounded LRU of computed features, by bytes: expensive once, a click later is a dot product.

Keys are feature ids (:func:`feature_id`): the SHA-256 of the uploaded bytes plus everything that
changes the features (LiFT iterations, resize policy, model input size). Values are
:class:`FeatureEntry` objects holding the features as float32, exactly as the runtime returned them,
so a cache hit answers bit-identically to a miss (float16 responses are cast per response).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import threading
from collections import OrderedDict
from collections.abc import Callable

import numpy as np
from lift_serve.service.geometry import ImageGeometry
from lift_serve.service.matching import cell_norms


def content_hash(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def feature_id(digest: str, iterations: int, geometry: ImageGeometry) -> str:
    """``<sha256 of the bytes, 32 hex>-k<iterations>-<policy>-<H>x<W>``: stable across restarts."""
    policy = "sq" if geometry.policy == "square" else "ka"
    return f"{digest[:32]}-k{iterations}-{policy}-{geometry.input_height}x{geometry.input_width}"


@dataclasses.dataclass(frozen=True)
class FeatureEntry:
    """Features of one uploaded image and what is needed to use them later.

    Attributes:
        id: the feature id (cache key).
        features: float32 ``[C, grid_height, grid_width]``.
        geometry: how the original image maps onto the grid.
        iterations: LiFT rounds used.
        image_bytes: the uploaded file, kept to draw overlays later (re-decoded on demand).
    """

    id: str
    features: np.ndarray
    geometry: ImageGeometry
    iterations: int
    image_bytes: bytes

    @functools.cached_property
    def cell_norms(self) -> np.ndarray:
        """``[grid_height, grid_width]`` descriptor norms, computed once so a click is one dot product."""
        return cell_norms(self.features)

    @property
    def nbytes(self) -> int:
        # features + uploaded file + the norms + rough object overhead
        size = int(self.features.nbytes)
        return size + size // max(1, self.features.shape[0]) + len(self.image_bytes) + 1024


class FeatureCache:
    """Thread-safe LRU bounded by total :attr:`FeatureEntry.nbytes`.

    Args:
        max_bytes: budget; 0 disables caching. An entry larger than the budget is not stored.
        on_hit, on_miss: called once per :meth:`get` outcome (metrics).
    """

    def __init__(self, max_bytes: int, on_hit: Callable[[], None] | None = None,
                 on_miss: Callable[[], None] | None = None):
        self.max_bytes = int(max_bytes)
        self._entries: OrderedDict[str, FeatureEntry] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()
        self._on_hit = on_hit or (lambda: None)
        self._on_miss = on_miss or (lambda: None)

    def get(self, key: str) -> FeatureEntry | None:
        with self._lock:
            entry = self._entries.get(key)
            if entry is not None:
                self._entries.move_to_end(key)
        (self._on_hit if entry is not None else self._on_miss)()
        return entry

    def put(self, entry: FeatureEntry) -> bool:
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
