"""The service's seam to inference engines: the :class:`Runtime` protocol, a registry of
implementations and :func:`open_runtime`, the one place a runtime is constructed.

ONNX Runtime (``service/ort_runtime.py``) is the first implementation. Adding one (a TensorRT
engine, a Triton client) is one new module implementing :class:`Runtime` plus one line in
:data:`RUNTIMES`; everything above (batching, cache, predictor, routes) talks only to the protocol.
"""

from __future__ import annotations

import importlib
from typing import Protocol, runtime_checkable

import numpy as np
from lift_serve.bundle import BundleError, Manifest, read_manifest

# kind -> "module:Class", imported on first use so that an absent engine costs nothing.
RUNTIMES = {
    "onnxruntime": "lift_serve.service.ort_runtime:BundleRuntime",
    "triton": "lift_serve.service.triton_runtime:TritonRuntime",
}


@runtime_checkable
class Runtime(Protocol):
    """What the service needs from an inference engine running a bundle."""

    manifest: Manifest
    sizes: list[tuple[int, int]]
    iterations: list[int]
    default_iterations: int
    channels: int
    patch_size: int
    demo: bool
    active_providers: list[str]

    def stride(self, iterations: int | None = None) -> float: ...

    def feature_size(self, height: int, width: int, iterations: int | None = None) -> tuple[int, int]: ...

    def embed(self, images: np.ndarray) -> np.ndarray:
        """uint8 [B, H, W, 3] -> backbone features [B, C, H/P, W/P] in the bundle's precision
        (float16 or float32: the service caches what the engine computed, not a widened copy)."""

    def upsample(self, images: np.ndarray, coarse: np.ndarray, iterations: int | None = None) -> np.ndarray:
        """Model-input pixels and their backbone features -> features at that density, in the
        bundle's precision."""

    def run(self, images: np.ndarray, iterations: int | None = None) -> np.ndarray:
        """embed, then upsample; float32."""

    def describe(self) -> dict: ...


def open_runtime(bundle_dir, kind: str = "onnxruntime", **options) -> Runtime:
    """Open ``bundle_dir`` with the runtime ``kind`` (options go to its constructor)."""
    if kind not in RUNTIMES:
        raise BundleError(f"unknown runtime {kind!r}; available: {sorted(RUNTIMES)}")
    module_name, class_name = RUNTIMES[kind].split(":")
    return getattr(importlib.import_module(module_name), class_name)(bundle_dir, **options)


__all__ = ["RUNTIMES", "BundleError", "Runtime", "open_runtime", "read_manifest"]
