"""What every runtime derives from a bundle's manifest alone, whatever engine runs the graphs.

:class:`ManifestRuntime` holds the attributes of the :class:`~lift_serve.service.runtime.Runtime`
protocol (sizes, densities, channels, patch size ...), the geometry (stride, feature grid), the
input checks, the dtypes each graph's tensors must have, the warm-up loop and the manifest part of
``describe()``. ONNX Runtime (``ort_runtime.py``) and Triton (``triton_runtime.py``) subclass it and
add only how a graph is run, so the two cannot drift apart on what a request may ask.
"""

from __future__ import annotations

import numpy as np
from lift_serve.bundle import BundleError, Manifest


class ManifestRuntime:
    """Attributes, geometry, input checks and warm-up of a runtime serving ``manifest``.

    A subclass calls :meth:`_adopt` with the validated manifest, implements :meth:`embed` and
    :meth:`upsample`, and may override :meth:`_warmup_error` to say what to do when warm-up fails.
    """

    manifest: Manifest
    sizes: list[tuple[int, int]]
    iterations: list[int]
    default_iterations: int
    channels: int
    patch_size: int
    demo: bool
    output_dtype: str
    feature_dtype: np.dtype
    active_providers: list[str]

    def _adopt(self, manifest: Manifest) -> None:
        self.manifest = manifest
        self.sizes = [(int(h), int(w)) for h, w in manifest.input.sizes]
        self.iterations = sorted(manifest.iterations)
        self.default_iterations = manifest.default_iterations
        self.channels = manifest.output.channels
        self.patch_size = manifest.backbone.patch_size
        self.demo = manifest.demo
        self.output_dtype = manifest.output.dtype
        # The graphs' float tensors (features, upsampler state): what embed/upsample return and the
        # service caches, not a widened copy.
        self.feature_dtype = np.dtype(np.float16 if self.output_dtype == "float16" else np.float32)

    def expected_types(self, role: str) -> tuple[list[str], list[str]]:
        """dtypes of the inputs and outputs of graph ``role`` (a key of ``Manifest.graph_files()``)."""
        model = self.output_dtype
        return {
            "backbone": (["uint8"], [model]),
            "upsampler_prepare": (["uint8"], [model]),
            "upsampler_step": ([model, model], [model, model]),
        }[role]

    # -- geometry ----------------------------------------------------------------------------
    def _resolve(self, iterations: int | None) -> int:
        k = self.default_iterations if iterations is None else iterations
        if k not in self.iterations:
            raise ValueError(f"LiFT iterations {k!r} not offered by this bundle; choose one of {self.iterations}")
        return k

    def stride(self, iterations: int | None = None) -> float:
        """Input pixels per feature cell (``patch_size / 2**iterations``)."""
        return self.manifest.stride(self._resolve(iterations))

    def feature_size(self, height: int, width: int, iterations: int | None = None) -> tuple[int, int]:
        """Feature grid ``(h, w)`` for a ``height x width`` input."""
        stride = self.stride(iterations)
        return int(round(height / stride)), int(round(width / stride))

    # -- inference ---------------------------------------------------------------------------
    def check_images(self, images) -> np.ndarray:
        """Validate a batch; returns it C-contiguous. Raises ValueError naming expected vs found."""
        if not isinstance(images, np.ndarray):
            raise ValueError(f"images must be a numpy array uint8 [B,H,W,3], found {type(images).__name__}")
        if images.dtype != np.uint8:
            raise ValueError(f"images must be uint8 pixels 0..255, found dtype {images.dtype}")
        if images.ndim != 4 or images.shape[3] != 3 or images.shape[0] < 1:
            raise ValueError(f"images must have shape [B,H,W,3] with B >= 1 (RGB), found {list(images.shape)}")
        size = (int(images.shape[1]), int(images.shape[2]))
        if size not in self.sizes:
            raise ValueError(
                f"input size {size[0]}x{size[1]} (height x width) is not supported by this bundle; "
                f"supported: {', '.join(f'{h}x{w}' for h, w in self.sizes)}; resize first"
            )
        return np.ascontiguousarray(images)

    def embed(self, images: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def upsample(self, images: np.ndarray, coarse: np.ndarray, iterations: int | None = None) -> np.ndarray:
        """Features at density ``iterations`` from backbone features ``coarse`` of ``images``:
        ``prepare`` once, then ``step`` k times (no backbone pass). ``[B, C, h, w]`` in the bundle's
        precision (:attr:`feature_dtype`)."""
        k = self._resolve(iterations)
        features = np.ascontiguousarray(coarse, dtype=self.feature_dtype)
        if k == 0:
            return features
        return self._steps(self.check_images(images), features, k)

    def _steps(self, images: np.ndarray, features: np.ndarray, k: int) -> np.ndarray:
        """The engine's part of :meth:`upsample`: ``prepare`` on ``images``, then ``k`` steps."""
        raise NotImplementedError

    def run(self, images: np.ndarray, iterations: int | None = None) -> np.ndarray:
        """Dense features of a batch at density ``iterations`` (None = :attr:`default_iterations`):
        backbone, then the upsampler. float32 ``[B, C, H/stride, W/stride]``."""
        k = self._resolve(iterations)
        return self.upsample(images, self.embed(images), k).astype(np.float32, copy=False)

    # -- warm-up -----------------------------------------------------------------------------
    def _warmup_error(self, problem: str, exc: Exception) -> BundleError:
        """The error for a graph that failed during warm-up; ``problem`` says which and where."""
        return BundleError(f"{problem} ({type(exc).__name__}: {str(exc)[:300]}); re-export the bundle with "
                           "`lift export`")

    def warmup(self, batch_sizes=(1,)) -> None:
        """Run the backbone and every offered density once at each supported size and each of
        ``batch_sizes`` (a GPU provider pays per new shape: a cuDNN search, a TensorRT engine)."""
        for (height, width), batch in ((size, b) for size in self.sizes for b in batch_sizes):
            images = np.zeros((batch, height, width, 3), np.uint8)
            try:
                coarse = self.embed(images)
            except Exception as exc:  # engines raise private types, e.g. a graph exported for one size
                raise self._warmup_error(f"the backbone graph cannot run at {height}x{width}, a size the manifest "
                                         "lists", exc) from None
            for k in self.iterations:
                try:
                    features = self.upsample(images, coarse, k)
                except Exception as exc:
                    raise self._warmup_error(f"the upsampler graphs cannot reach density {k} at {height}x{width} "
                                             f"(batch {batch}), which the manifest lists", exc) from None
                expected = (batch, self.channels, *self.feature_size(height, width, k))
                if features.shape != expected:
                    raise BundleError(
                        f"density {k} gives {features.shape} at {height}x{width}, the manifest implies "
                        f"{expected}; re-export the bundle"
                    )

    def describe(self) -> dict:
        """A JSON-ready summary for ``/v1/models`` and logs."""
        m = self.manifest
        return {
            "backbone": m.backbone.timm_name,
            "upsampler": m.upsampler.kind if m.upsampler else None,
            "demo": self.demo,
            "sizes": [list(s) for s in self.sizes],
            "iterations": self.iterations,
            "default_iterations": self.default_iterations,
            "strides": {str(k): self.stride(k) for k in self.iterations},
            "channels": self.channels,
            "precision": m.onnx.precision,
            "providers": self.active_providers,
            "parity": {"max_abs_err": m.parity.max_abs_err, "min_cosine": m.parity.min_cosine},
        }
