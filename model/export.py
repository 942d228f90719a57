"""Export a DenseExtractor to an ONNX bundle, with parity against PyTorch measured at export.

The graph contract (see ``lift_serve.bundle`` (``bundle/``) for the manifest):

* input ``image``: uint8 ``[B, H, W, 3]`` RGB pixels, NHWC, as images are decoded. Normalisation
  with the backbone's mean/std happens inside the graph, so a client sends 4x fewer bytes than
  float32 and cannot get mean/std wrong. ``B``, ``H`` and ``W`` are dynamic axes; the bundle
  lists the ``(H, W)`` sizes that were verified and warmed up, and the runtime accepts only those.
* output ``features``: ``[B, C, H/s, W/s]`` NCHW, float32 (float16 for ``precision="fp16"``),
  where ``s = patch_size / 2**k`` for a graph with ``k`` LiFT rounds.

Graphs are exported with the dynamo-based exporter (``torch.onnx.export(..., dynamo=True)``):
the TorchScript exporter bakes timm's position-embedding resampling for the example size, after
which other sizes silently compute wrong features. Every listed size is therefore checked against
PyTorch (batch 1 and batch 2, natural-looking and random pixels) before the bundle is published.

The model is wrapped (:class:`BundleGraph`), not modified: ``DenseExtractor`` stays the module
that training and evaluation use.
"""

from __future__ import annotations

import contextlib
import copy
import datetime
import io
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import torch
from lift_serve.bundle import (
    FORMAT_VERSION,
    MANIFEST_NAME,
    PRECISIONS,
    BundleError,
    graph_file_name,
    read_manifest,
    sha256_file,
    validate_manifest,
)
from lift_serve.model.backbone import BackboneSpec, ViTBackbone
from lift_serve.model.extractor import DenseExtractor
from lift_serve.model.lift import LiFT
from torch import nn

logger = logging.getLogger("lift.export")

INPUT_NAME = "image"
OUTPUT_NAME = "features"
# Minimum per-vector cosine between ONNX Runtime and PyTorch fp32 below which export fails.
MIN_COSINE = {"fp32": 0.9999, "fp16": 0.999}
PARITY_BATCH = 2
DEMO_SPEC = {"name": "vit_small_patch16_224", "weights": "random", "seed": 0, "layer": -1, "facet": "key",
             "model_kwargs": {}, "channel_layout": "interleaved", "pos_interpolation": "timm"}
DEMO_ITERATIONS = (0, 1)
DEMO_SIZES = ((224, 224), (448, 448))
DEMO_LIFT_SEED = 0


class ExportError(ValueError):
    """Export cannot proceed or failed verification; the message says why and what to do."""

    user_facing = True


class BundleGraph(nn.Module):
    """The exported function: uint8 NHWC RGB pixels -> dense features NCHW.

    Args:
        extractor: the DenseExtractor to export (its ``preprocessing`` supplies mean/std).
        precision: ``"fp32"`` or ``"fp16"``. For fp16 the extractor should already be cast to half;
            normalisation still runs in float32 (pixels/255 and mean/std need the mantissa) and the
            result is cast once before the backbone.
    """

    def __init__(self, extractor: DenseExtractor, precision: str = "fp32"):
        super().__init__()
        self.extractor = extractor
        self.dtype = torch.float16 if precision == "fp16" else torch.float32

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        """[B,H,W,3] uint8 RGB -> [B,C,2^k H/P,2^k W/P] features."""
        x = self.extractor.preprocessing.normalize(image.permute(0, 3, 1, 2))
        return self.extractor(x.to(self.dtype))


# -- test inputs ----------------------------------------------------------------------------
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


# -- export ---------------------------------------------------------------------------------
def _export_graph(graph: BundleGraph, path: Path, multiple: int, opset: int | None) -> None:
    """Write ``graph`` as one self-contained ONNX file with dynamic batch, height and width."""
    # A non-square example grid (4 x 6 patches) keeps the exporter from specialising on a square
    # or on the backbone's native grid; batch 2 keeps it from specialising batch to 1.
    example = torch.zeros(PARITY_BATCH, 4 * multiple, 6 * multiple, 3, dtype=torch.uint8)
    dynamic = {"image": {0: torch.export.Dim.DYNAMIC, 1: torch.export.Dim.DYNAMIC, 2: torch.export.Dim.DYNAMIC}}
    chatter = io.StringIO()
    try:
        with contextlib.redirect_stdout(chatter), torch.no_grad():
            program = torch.onnx.export(
                graph, (example,), dynamo=True, dynamic_shapes=dynamic, input_names=[INPUT_NAME],
                output_names=[OUTPUT_NAME], opset_version=opset, verbose=False,
            )
            program.save(str(path), external_data=False)
    except Exception as exc:
        raise ExportError(
            f"torch.onnx.export failed for {path.name}: {type(exc).__name__}: {str(exc)[:600]}"
        ) from exc
    logger.debug("exporter output: %s", chatter.getvalue()[-2000:])


def _graph_opset(path: Path) -> int:
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    return next(int(o.version) for o in model.opset_import if o.domain in ("", "ai.onnx"))


def _parity_session(path: Path):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"])


def measure_parity(reference: BundleGraph, path: Path, iterations: int, sizes, precision: str) -> list[dict]:
    """Run the exported graph under ONNX Runtime (CPU) and the fp32 PyTorch reference on the
    :func:`parity_inputs` at every size; return one record per (size, batch)."""
    session = _parity_session(path)
    cases = []
    for height, width in sizes:
        for kinds, batch in parity_inputs(height, width):
            with torch.no_grad():
                expected = reference(torch.from_numpy(batch)).numpy()
            (found,) = session.run([OUTPUT_NAME], {INPUT_NAME: batch})
            if found.shape != expected.shape:
                raise ExportError(
                    f"{path.name} at {height}x{width}: ONNX Runtime returns {found.shape}, PyTorch {expected.shape}"
                )
            stats = compare_features(expected, found)
            cases.append({"iterations": iterations, "size": [height, width], "batch": len(batch),
                          "inputs": kinds, **stats})
            threshold = MIN_COSINE[precision]
            if stats["min_cosine"] < threshold:
                raise ExportError(
                    f"parity check failed for {path.name} ({precision}) at {height}x{width}, batch {len(batch)} "
                    f"({'+'.join(kinds)} input): min cosine {stats['min_cosine']:.6f} < {threshold}, max abs "
                    f"error {stats['max_abs_err']:.3g}. The graph does not reproduce PyTorch; try another "
                    "--opset or --precision fp32, and report the backbone if it persists."
                )
    return cases


def normalise_sizes(sizes: Iterable, multiple: int) -> list[tuple[int, int]]:
    """Sizes as unique ``(height, width)`` pairs (an int means a square), each a multiple of ``multiple``."""
    result = []
    for size in sizes:
        height, width = (size, size) if isinstance(size, int) else tuple(size)
        if height <= 0 or width <= 0 or height % multiple or width % multiple:
            raise ExportError(
                f"size {height}x{width} is not a positive multiple of the patch size {multiple}; "
                f"use e.g. {max(1, round(height / multiple)) * multiple}x{max(1, round(width / multiple)) * multiple}"
            )
        if (height, width) not in result:
            result.append((int(height), int(width)))
    if not result:
        raise ExportError("no input sizes given; pass --sizes, e.g. 224 or 224,448 or 224x320")
    return result


def _default_iterations(iterations: Sequence[int], wanted: int | None) -> int:
    if wanted is not None:
        if wanted not in iterations:
            raise ExportError(f"default iterations {wanted} is not among the exported iterations {list(iterations)}")
        return wanted
    return 1 if 1 in iterations else max(iterations)


def _publish(tmp_dir: Path, out_dir: Path) -> None:
    """Move the finished bundle into place; an existing bundle there is replaced."""
    if out_dir.exists():
        if not out_dir.is_dir() or (any(out_dir.iterdir()) and not (out_dir / MANIFEST_NAME).is_file()):
            raise ExportError(
                f"{out_dir} exists and is not a bundle; choose another --out or remove it first"
            )
        old = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.old-", dir=out_dir.parent))
        out_dir.replace(old / "bundle")
        tmp_dir.replace(out_dir)
        shutil.rmtree(old, ignore_errors=True)
    else:
        tmp_dir.replace(out_dir)


def export_modules(
    out_dir: str | Path,
    backbone: ViTBackbone,
    lift: LiFT | None,
    lift_iterations: Sequence[int] = (1,),
    sizes: Iterable = ((224, 224),),
    precision: str = "fp32",
    opset: int | None = None,
    demo: bool = False,
    check_parity: bool = True,
    checkpoint_sha256: str | None = None,
    checkpoint_format: str | None = None,
    default_iterations: int | None = None,
) -> Path:
    """Export already-built modules to a bundle at ``out_dir``; see :func:`export_bundle`."""
    if precision not in PRECISIONS:
        raise ExportError(f"precision must be one of {sorted(PRECISIONS)}, got {precision!r}")
    iterations = sorted({int(k) for k in lift_iterations})
    if not iterations or iterations[0] < 0:
        raise ExportError(f"LiFT iterations must be integers >= 0, got {list(lift_iterations)}")
    if iterations[-1] > 0 and lift is None:
        raise ExportError(
            f"LiFT iterations {iterations} need LiFT weights: pass --checkpoint (ours .safetensors or the "
            "authors' .pth), or export --lift-iterations 0 for backbone features only"
        )
    sizes = normalise_sizes(sizes, backbone.patch_size)
    default_k = _default_iterations(iterations, default_iterations)
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp_dir = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        graphs, parity_cases = [], []
        for k in iterations:
            extractor = DenseExtractor(backbone, lift if k > 0 else None, k).eval()
            reference = BundleGraph(extractor, "fp32").eval()
            exported = reference if precision == "fp32" else BundleGraph(copy.deepcopy(extractor).half(), "fp16")
            path = tmp_dir / graph_file_name(k)
            logger.info("exporting %s (%d LiFT iterations, %s)", path.name, k, precision)
            _export_graph(exported.eval(), path, backbone.patch_size, opset)
            if check_parity:
                parity_cases += measure_parity(reference, path, k, sizes, precision)
            graphs.append({"iterations": k, "file": path.name, "stride": extractor.stride,
                           "sha256": sha256_file(path)})
        manifest = _manifest(backbone, iterations, default_k, sizes, precision, demo, graphs, parity_cases,
                             checkpoint_sha256, checkpoint_format, check_parity,
                             _graph_opset(tmp_dir / graphs[0]["file"]))
        validate_manifest(manifest, "generated manifest")
        (tmp_dir / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2) + "\n")
        _publish(tmp_dir, out_dir)
    finally:
        if tmp_dir.exists():
            shutil.rmtree(tmp_dir, ignore_errors=True)
    return out_dir


def _manifest(backbone, iterations, default_k, sizes, precision, demo, graphs, cases, checkpoint_sha256,
              checkpoint_format, checked, opset) -> dict:
    spec = backbone.spec
    worst = {
        "max_abs_err": max((c["max_abs_err"] for c in cases), default=None),
        "min_cosine": min((c["min_cosine"] for c in cases), default=None),
    }
    return {
        "format_version": FORMAT_VERSION,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "demo": bool(demo),
        "backbone": {"timm_name": spec.name, "weights": spec.weights, "seed": spec.seed,
                     "patch_size": backbone.patch_size, "embed_dim": backbone.embed_dim, "layer": spec.layer,
                     "facet": spec.facet, "model_kwargs": dict(spec.model_kwargs),
                     "channel_layout": spec.channel_layout, "pos_interpolation": spec.pos_interpolation},
        "lift": {"iterations": iterations, "default_iterations": default_k,
                 "checkpoint_sha256": checkpoint_sha256, "checkpoint_format": checkpoint_format},
        "input": {"name": INPUT_NAME, "sizes": [list(s) for s in sizes], "dtype": "uint8", "layout": "NHWC",
                  "color": "RGB", "mean": list(backbone.mean), "std": list(backbone.std),
                  "multiple": backbone.patch_size},
        "output": {"name": OUTPUT_NAME, "channels": backbone.embed_dim, "dtype": PRECISIONS[precision],
                   "layout": "NCHW"},
        "graphs": graphs,
        "onnx": {"opset": opset, "precision": precision, "exporter": "torch.onnx.export(dynamo=True)",
                 "torch_version": torch.__version__},
        "parity": {"checked": bool(checked), "reference": "PyTorch fp32 eager, CPU", "runtime": "onnxruntime CPU",
                   "min_cosine_required": MIN_COSINE[precision], **worst, "cases": cases},
    }


def export_bundle(
    out_dir: str | Path,
    spec: BackboneSpec | None,
    checkpoint: str | Path | None = None,
    lift_iterations: Sequence[int] = (1,),
    sizes: Iterable = ((224, 224),),
    precision: str = "fp32",
    opset: int | None = None,
    demo: bool = False,
    check_parity: bool = True,
    default_iterations: int | None = None,
) -> Path:
    """Build the extractor from a backbone spec and a LiFT checkpoint and write a bundle.

    Args:
        out_dir: bundle directory to create (replaced atomically if it already holds a bundle).
        spec: the backbone; None takes it from our checkpoint's sidecar. Required with the authors'
            ``.pth`` (it does not record the backbone).
        checkpoint: our ``.safetensors`` (+ ``.json`` sidecar) or the authors' ``.pth``; None allows
            only ``lift_iterations=(0,)``.
        lift_iterations: one graph is exported per value (0 = backbone features alone).
        sizes: supported input sizes, ints (squares) or ``(height, width)``; each is verified.
        precision: ``"fp32"`` or ``"fp16"`` (weights and activations in half; output float16).
        opset: ONNX opset; None = the exporter's default.
        demo: mark the bundle as an untrained demo in the manifest.
        check_parity: measure ORT vs PyTorch and fail below :data:`MIN_COSINE` (leave on).
        default_iterations: the runtime's default; None = 1 if offered, else the largest.

    Returns:
        ``out_dir`` as a Path.
    """
    from lift_serve.model.factory import load_backbone_and_lift

    if checkpoint is not None and not Path(checkpoint).is_file():
        raise ExportError(f"checkpoint {checkpoint} does not exist; pass the path of a LiFT checkpoint")
    if checkpoint is None and any(int(k) > 0 for k in lift_iterations):
        raise ExportError(
            f"LiFT iterations {sorted(lift_iterations)} need LiFT weights: pass --checkpoint (our .safetensors "
            "or the authors' .pth), or --lift-iterations 0 for backbone features only"
        )
    checkpoint_format = None if checkpoint is None else (
        "ours" if Path(checkpoint).suffix == ".safetensors" else "authors")
    if checkpoint_format == "authors" and spec is None:
        raise ExportError("an authors' .pth checkpoint does not record its backbone; name it with --backbone")
    backbone, lift, _ = load_backbone_and_lift(spec, checkpoint)
    return export_modules(
        out_dir, backbone, lift, lift_iterations, sizes, precision, opset, demo, check_parity,
        checkpoint_sha256=None if checkpoint is None else sha256_file(checkpoint),
        checkpoint_format=checkpoint_format, default_iterations=default_iterations,
    )


def _is_current_demo(out_dir: Path) -> bool:
    try:
        manifest = read_manifest(out_dir)
    except BundleError:
        return False
    backbone = manifest["backbone"]
    same = (manifest["demo"] and backbone["timm_name"] == DEMO_SPEC["name"]
            and backbone["weights"] == "random" and backbone["seed"] == DEMO_SPEC["seed"]
            and backbone["model_kwargs"] == DEMO_SPEC["model_kwargs"]
            and backbone.get("channel_layout") == DEMO_SPEC["channel_layout"]
            and manifest["lift"]["iterations"] == list(DEMO_ITERATIONS)
            and manifest["input"]["sizes"] == [list(s) for s in DEMO_SIZES])
    return same and all(
        (out_dir / g["file"]).is_file() and sha256_file(out_dir / g["file"]) == g["sha256"]
        for g in manifest["graphs"]
    )


def demo_modules() -> tuple[ViTBackbone, LiFT]:
    """The demo bundle's (backbone, LiFT): DEMO_SPEC and a LiFT initialised under DEMO_LIFT_SEED."""
    backbone = ViTBackbone.from_spec(BackboneSpec.from_dict(copy.deepcopy(DEMO_SPEC)))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(DEMO_LIFT_SEED)
        lift = LiFT(backbone.embed_dim, backbone.patch_size).eval()
    return backbone, lift


def export_demo_bundle(out_dir: str | Path) -> Path:
    """A demo bundle for trying the service without trained weights (``lift serve --demo``).

    Full-depth ViT-S/16 (``vit_small_patch16_224``, random weights, seed 0, key facet of the last
    block) so that its speed and memory are those of the real model, and an untrained LiFT
    (``LiFT(384, 16)`` initialised under seed 0); graphs for 0 and 1 LiFT iterations; sizes 224 and
    448. Its features are meaningless (random weights): the manifest says ``demo: true``.

    An existing valid demo bundle at ``out_dir`` (same recipe, graphs matching their sha256) is
    reused instead of exported again.
    """
    out_dir = Path(out_dir)
    if _is_current_demo(out_dir):
        logger.info("reusing demo bundle at %s", out_dir)
        return out_dir
    backbone, lift = demo_modules()
    logger.info("exporting demo bundle to %s (about a minute on 2 CPU cores)", out_dir)
    return export_modules(out_dir, backbone, lift, DEMO_ITERATIONS, DEMO_SIZES, demo=True)


def default_demo_dir() -> Path:
    """Where ``lift serve --demo`` keeps its demo bundle: ``$LIFT_DEMO_DIR``, else
    ``~/.cache/lift-serve/demo-bundle`` (the same rule as the service's ``LIFT_DEMO_DIR`` setting)."""
    explicit = os.environ.get("LIFT_DEMO_DIR")
    if explicit:
        return Path(os.path.expanduser(explicit))
    return Path(os.path.expanduser("~")) / ".cache" / "lift-serve" / "demo-bundle"
