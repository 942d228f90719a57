"""Parity at export: ONNX Runtime (CPU) against the PyTorch fp32 modules, per graph and for every
chained density, on natural-looking and random images at every listed size, batch 1 and 2.

Cases recorded in the manifest:

* ``backbone``: the backbone graph against the backbone;
* ``upsampler_step``: one step graph run on PyTorch's own round-1 inputs, against the step;
* ``chain`` (k >= 1): backbone -> prepare -> k steps, all in ONNX Runtime, against the extractor with
  k rounds: what the service computes for density k.

A case below :data:`MIN_COSINE` (the minimum per-vector cosine over channels) fails the export.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from lift_serve.model.extractor import DenseExtractor
from lift_serve.model.onnx_graphs import FEATURES, IMAGE, STATE, ExportError

MIN_COSINE = {"fp32": 0.9999, "fp16": 0.999}
TORCH_DTYPES = {"fp32": torch.float32, "fp16": torch.float16}


def natural_image(height: int, width: int, seed: int = 0) -> np.ndarray:
    """A deterministic natural-looking uint8 ``[H, W, 3]`` RGB image: smooth colour gradients,
    a few flat-coloured shapes with sharp edges, and mild texture. Random pixels alone exercise a
    narrow, unnatural part of the input space (no edges, no smooth regions)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    yy, xx = yy / max(height - 1, 1), xx / max(width - 1, 1)
    image = np.stack([
        0.5 + 0.4 * np.sin(2 * np.pi * (rng.uniform(0.3, 1.5) * xx + rng.uniform(0, 1))) * yy,
        0.3 + 0.6 * xx * (1 - yy),
        0.4 + 0.3 * np.cos(2 * np.pi * rng.uniform(0.5, 2.0) * yy),
    ], axis=-1)
    for _ in range(6):
        cy, cx = rng.uniform(0, 1, 2)
        ry, rx = rng.uniform(0.05, 0.3, 2)
        colour = rng.uniform(0, 1, 3)
        if rng.random() < 0.5:
            mask = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 < 1
        else:
            mask = (np.abs(yy - cy) < ry) & (np.abs(xx - cx) < rx)
        image[mask] = colour
    image += rng.normal(0, 0.03, image.shape).astype(np.float32)
    return (np.clip(image, 0, 1) * 255).round().astype(np.uint8)


def random_image(height: int, width: int, seed: int = 0) -> np.ndarray:
    """Uniform random uint8 ``[H, W, 3]`` pixels."""
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def parity_inputs(height: int, width: int) -> list[tuple[list[str], np.ndarray]]:
    """The batches parity is measured on: batch 1 natural, batch 2 random + natural."""
    return [
        (["natural"], natural_image(height, width, seed=1)[None]),
        (["random", "natural"], np.stack([random_image(height, width, seed=2), natural_image(height, width, seed=3)])),
    ]


def compare_features(reference: np.ndarray, candidate: np.ndarray) -> dict:
    """Max abs error and minimum per-vector cosine of two ``[B, C, h, w]`` arrays (over C)."""
    reference = reference.astype(np.float64)
    candidate = candidate.astype(np.float64)
    dot = (reference * candidate).sum(axis=1)
    norms = np.linalg.norm(reference, axis=1) * np.linalg.norm(candidate, axis=1)
    cosine = dot / np.maximum(norms, 1e-12)
    return {"max_abs_err": float(np.abs(reference - candidate).max()), "min_cosine": float(cosine.min()),
            "max_abs_ref": float(np.abs(reference).max())}


def _session(path: Path):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"])


class ChainSessions:
    """The bundle's graphs in ONNX Runtime, chained as the service chains them."""

    def __init__(self, backbone: Path, prepare: Path | None, step: Path | None):
        self.backbone = _session(backbone)
        self.prepare = _session(prepare) if prepare else None
        self.step = _session(step) if step else None

    def run(self, images: np.ndarray, steps: int) -> np.ndarray:
        (features,) = self.backbone.run([FEATURES], {IMAGE: images})
        if steps == 0:
            return features
        (state,) = self.prepare.run([STATE], {IMAGE: images})
        for _ in range(steps):
            state, features = self.step.run(None, {STATE: state, FEATURES: features})
        return features


def _check(case: dict, precision: str, what: str) -> dict:
    if case["min_cosine"] < MIN_COSINE[precision]:
        raise ExportError(
            f"parity check failed for {what} ({precision}) at {case['size'][0]}x{case['size'][1]}, batch "
            f"{case['batch']} ({'+'.join(case['inputs'])} input): min cosine {case['min_cosine']:.6f} < "
            f"{MIN_COSINE[precision]}, max abs error {case['max_abs_err']:.3g}. The graph does not reproduce "
            "PyTorch; try another --opset or --precision fp32, and report the backbone if it persists."
        )
    return case


def measure_parity(extractor: DenseExtractor, sessions: ChainSessions, iterations: list[int], sizes,
                   precision: str) -> list[dict]:
    """Every case for every size; raises ExportError on the first below the threshold."""
    cases = []
    prep = extractor.preprocessing
    dtype = TORCH_DTYPES[precision]
    for height, width in sizes:
        for kinds, batch in parity_inputs(height, width):
            base = {"size": [height, width], "batch": len(batch), "inputs": kinds}
            with torch.no_grad():
                image = prep.normalize(torch.from_numpy(batch).permute(0, 3, 1, 2))
                coarse = extractor.backbone(image)
                expected = {0: coarse.numpy()}
                for k in (k for k in iterations if k > 0):
                    expected[k] = extractor.run_upsampler(image, coarse, k).numpy()
            found = sessions.run(batch, 0)
            cases.append(_check({"graph": "backbone", "iterations": 0, **base,
                                 **compare_features(expected[0], found)}, precision, "the backbone graph"))
            if sessions.step is None:
                continue
            with torch.no_grad():
                state = extractor.lift.prepare(image)
                _, one_step = extractor.lift.step(state, coarse)
            (_, stepped) = sessions.step.run(None, {STATE: state.to(dtype).numpy(),
                                                    FEATURES: coarse.to(dtype).numpy()})
            cases.append(_check({"graph": "upsampler_step", "iterations": 1, **base,
                                 **compare_features(one_step.numpy(), stepped)}, precision, "the step graph"))
            for k in (k for k in iterations if k > 0):
                cases.append(_check({"graph": "chain", "iterations": k, **base,
                                     **compare_features(expected[k], sessions.run(batch, k))},
                                    precision, f"density {k} (backbone, prepare, {k} steps)"))
    return cases


__all__ = ["MIN_COSINE", "ChainSessions", "compare_features", "measure_parity", "natural_image", "parity_inputs",
           "random_image"]
