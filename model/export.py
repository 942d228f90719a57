"""Export a backbone and an upsampler to a format-2 ONNX bundle, with parity against PyTorch
measured at export.

The bundle (see ``lift_serve.bundle``): one backbone graph (uint8 NHWC image -> coarse features,
normalisation inside) and the upsampler's two graphs, ``prepare`` (image -> state, once per image)
and ``step`` ((state, features) -> (state, 2x features), applied k times), described generically in
the manifest. The backbone runs once per image; every density costs only upsampler steps. The graphs
themselves are built in ``model.onnx_graphs``, parity in ``model.parity``, the demo in ``model.demo``.
"""

from __future__ import annotations

import datetime
import json
import logging
import shutil
import tempfile
from collections.abc import Iterable, Sequence
from pathlib import Path

import torch
from lift_serve.bundle import (
    BACKBONE_GRAPH,
    CHAIN_PREPARE_THEN_STEPS,
    FORMAT_VERSION,
    MANIFEST_NAME,
    PRECISIONS,
    PREPARE_GRAPH,
    STEP_GRAPH,
    sha256_file,
    validate_manifest,
)
from lift_serve.model.backbone import BackboneSpec, ViTBackbone
from lift_serve.model.checkpoint import is_ours
from lift_serve.model.extractor import DenseExtractor
from lift_serve.model.onnx_graphs import (
    FEATURES,
    IMAGE,
    NEXT_FEATURES,
    NEXT_STATE,
    STATE,
    BackboneGraph,
    ExportError,
    PrepareGraph,
    StepGraph,
    export_image_graph,
    export_step_graph,
    graph_opset,
)
from lift_serve.model.parity import MIN_COSINE, TORCH_DTYPES, ChainSessions, measure_parity, natural_image
from lift_serve.model.publish import publish_directory
from torch import nn

logger = logging.getLogger("lift.export")

# The most upsampler steps an export offers: 2^5 = 32x the patch grid (stride 0.5 for patch 16).
MAX_STEPS = 5


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


def _graph_entry(path: Path, inputs: list[str], outputs: list[str]) -> dict:
    return {"file": path.name, "sha256": sha256_file(path), "inputs": inputs, "outputs": outputs}


def _write_graphs(tmp_dir: Path, backbone: ViTBackbone, upsampler: nn.Module | None, precision: str,
                  opset: int | None) -> dict:
    """Export the backbone graph and, with an upsampler, its prepare and step graphs into ``tmp_dir``."""
    dtype = TORCH_DTYPES[precision]
    prep = DenseExtractor(backbone).preprocessing
    model_backbone = backbone if precision == "fp32" else _half_copy(backbone)
    logger.info("exporting %s (%s)", BACKBONE_GRAPH, precision)
    export_image_graph(BackboneGraph(model_backbone, prep, dtype).eval(), FEATURES, tmp_dir / BACKBONE_GRAPH,
                       backbone.patch_size, opset)
    graphs = {"backbone": _graph_entry(tmp_dir / BACKBONE_GRAPH, [IMAGE], [FEATURES])}
    if upsampler is not None:
        model_upsampler = upsampler if precision == "fp32" else _half_copy(upsampler)
        logger.info("exporting %s and %s (%s)", PREPARE_GRAPH, STEP_GRAPH, precision)
        export_image_graph(PrepareGraph(model_upsampler, prep, dtype).eval(), STATE, tmp_dir / PREPARE_GRAPH,
                           backbone.patch_size, opset)
        export_step_graph(StepGraph(model_upsampler).eval(), backbone.embed_dim, backbone.patch_size, dtype,
                          tmp_dir / STEP_GRAPH, opset)
        graphs["prepare"] = _graph_entry(tmp_dir / PREPARE_GRAPH, [IMAGE], [STATE])
        graphs["step"] = _graph_entry(tmp_dir / STEP_GRAPH, [STATE, FEATURES], [NEXT_STATE, NEXT_FEATURES])
    return graphs


def _half_copy(module: nn.Module) -> nn.Module:
    import copy

    return copy.deepcopy(module).half().eval()


def export_modules(
    out_dir: str | Path,
    backbone: ViTBackbone,
    lift: nn.Module | None,
    lift_iterations: Sequence[int] = (1,),
    sizes: Iterable = ((224, 224),),
    precision: str = "fp32",
    opset: int | None = None,
    demo: bool = False,
    check_parity: bool = True,
    checkpoint_sha256: str | None = None,
    checkpoint_format: str | None = None,
    default_iterations: int | None = None,
    upsampler_trained: bool | None = None,
) -> Path:
    """Export already-built modules (``lift``: any registered upsampler) to a bundle at ``out_dir``;
    see :func:`export_bundle`. ``upsampler_trained=False`` (or ``demo``) flags the upsampler's weights
    as untrained in the manifest, a ``random`` backbone spec flags the backbone's."""
    if precision not in PRECISIONS:
        raise ExportError(f"precision must be one of {sorted(PRECISIONS)}, got {precision!r}")
    iterations = sorted({int(k) for k in lift_iterations})
    if not iterations or iterations[0] < 0 or iterations[-1] > MAX_STEPS:
        raise ExportError(f"LiFT iterations must be integers from 0 to {MAX_STEPS}, got {list(lift_iterations)}")
    if iterations[-1] > 0 and lift is None:
        raise ExportError(
            f"LiFT iterations {iterations} need LiFT weights: pass --checkpoint (ours .safetensors or the "
            "authors' .pth), or export --lift-iterations 0 for backbone features only"
        )
    upsampler = lift if iterations[-1] > 0 else None
    sizes = normalise_sizes(sizes, backbone.patch_size)
    default_k = _default_iterations(iterations, default_iterations)
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp_dir = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        tmp_dir.chmod(0o755)  # readable by the service's user, as any published directory
        graphs = _write_graphs(tmp_dir, backbone, upsampler, precision, opset)
        cases = []
        if check_parity:
            sessions = ChainSessions(tmp_dir / BACKBONE_GRAPH, tmp_dir / PREPARE_GRAPH if upsampler else None,
                                     tmp_dir / STEP_GRAPH if upsampler else None)
            cases = measure_parity(DenseExtractor(backbone, upsampler, 0).eval(), sessions, iterations, sizes,
                                   precision)
        random_weights = [part for part, random in (
            ("backbone", demo or backbone.spec.weights == "random"),
            ("upsampler", upsampler is not None and (demo or upsampler_trained is False))) if random]
        manifest = _manifest(backbone, upsampler, iterations, default_k, sizes, precision, demo, graphs, cases,
                             checkpoint_sha256, checkpoint_format, check_parity,
                             graph_opset(tmp_dir / BACKBONE_GRAPH))
        manifest["random_weights"] = random_weights
        validate_manifest(manifest, "generated manifest")
        (tmp_dir / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2) + "\n")
        publish_directory(tmp_dir, out_dir)
    finally:
        if tmp_dir.exists():
            shutil.rmtree(tmp_dir, ignore_errors=True)
    return out_dir


def _manifest(backbone, upsampler, iterations, default_k, sizes, precision, demo, graphs, cases,
              checkpoint_sha256, checkpoint_format, checked, opset) -> dict:
    spec = backbone.spec
    worst = {
        "max_abs_err": max((c["max_abs_err"] for c in cases), default=None),
        "min_cosine": min((c["min_cosine"] for c in cases), default=None),
    }
    upsampler_info = None
    if upsampler is not None:
        upsampler_info = {
            "kind": upsampler.kind, "parameters": upsampler.config(),
            "checkpoint_sha256": checkpoint_sha256, "checkpoint_format": checkpoint_format,
            "chain": CHAIN_PREPARE_THEN_STEPS, "scale_per_step": 2, "max_steps": max(iterations),
            "graphs": {"prepare": graphs["prepare"], "step": graphs["step"]},
        }
    return {
        "format_version": FORMAT_VERSION,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "demo": bool(demo),
        "backbone": {"timm_name": spec.name, "weights": spec.weights, "seed": spec.seed,
                     "patch_size": backbone.patch_size, "embed_dim": backbone.embed_dim, "layer": spec.layer,
                     "facet": spec.facet, "model_kwargs": dict(spec.model_kwargs),
                     "channel_layout": spec.channel_layout, "pos_interpolation": spec.pos_interpolation,
                     "graph": graphs["backbone"]},
        "upsampler": upsampler_info,
        "iterations": iterations,
        "default_iterations": default_k,
        "input": {"name": IMAGE, "sizes": [list(s) for s in sizes], "dtype": "uint8", "layout": "NHWC",
                  "color": "RGB", "mean": list(backbone.mean), "std": list(backbone.std),
                  "multiple": backbone.patch_size},
        "output": {"name": FEATURES, "channels": backbone.embed_dim, "dtype": PRECISIONS[precision],
                   "layout": "NCHW"},
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
    checkpoint_format = None if checkpoint is None else ("ours" if is_ours(checkpoint) else "authors")
    if checkpoint_format == "authors" and spec is None:
        raise ExportError("an authors' checkpoint (LiFT .pth, UPLiFT .safetensors without a sidecar) does not "
                          "record its backbone; name it with --backbone")
    backbone, lift, meta = load_backbone_and_lift(spec, checkpoint)
    # Trained: an authors' release, or our checkpoint written by `lift train` (it records its steps).
    trained = checkpoint_format == "authors" or bool(meta is not None and meta.steps)
    return export_modules(
        out_dir, backbone, lift, lift_iterations, sizes, precision, opset, demo, check_parity,
        checkpoint_sha256=None if checkpoint is None else sha256_file(checkpoint),
        checkpoint_format=checkpoint_format, default_iterations=default_iterations,
        upsampler_trained=trained if checkpoint is not None else None,
    )


__all__ = ["BackboneSpec", "ExportError", "export_bundle", "export_modules", "natural_image", "normalise_sizes"]
