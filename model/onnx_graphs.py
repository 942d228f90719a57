"""The three exported functions of a format-2 bundle and how each is written to ONNX.

* :class:`BackboneGraph`: ``image`` uint8 ``[B, H, W, 3]`` RGB -> ``features`` ``[B, C, H/P, W/P]``.
  Normalisation with the backbone's mean/std happens inside, so a client sends 4x fewer bytes than
  float32 and cannot get mean/std wrong.
* :class:`PrepareGraph`: ``image`` -> ``state``, the upsampler's per-image state (``prepare``).
* :class:`StepGraph`: ``(state, features)`` -> ``(next_state, next_features)`` (``step``): twice the
  density; applied k times.

All axes that vary are dynamic; the step graph ties the state's spatial size to the features' grid
(``state = P x grid``) so that one graph serves every round and size. Graphs are exported with the
dynamo-based exporter (``torch.onnx.export(..., dynamo=True)``): the TorchScript exporter bakes the
position-embedding resampling for the example size. The modules are wrapped, not modified.
"""

from __future__ import annotations

import contextlib
import io
import logging
import warnings
from pathlib import Path

import torch
from lift_serve.model.extractor import DenseExtractor, Preprocessing
from torch import nn

logger = logging.getLogger("lift.export")

IMAGE = "image"
FEATURES = "features"
STATE = "state"
NEXT_STATE = "next_state"
NEXT_FEATURES = "next_features"
EXAMPLE_BATCH = 2  # batch 2 keeps the exporter from specialising the batch axis to 1


class ExportError(ValueError):
    """Export cannot proceed or failed verification; the message says why and what to do."""

    user_facing = True


def _normalised(preprocessing: Preprocessing, image: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    # Normalisation runs in float32 (pixels/255 and mean/std need the mantissa), cast once after.
    return preprocessing.normalize(image.permute(0, 3, 1, 2)).to(dtype)


class BackboneGraph(nn.Module):
    def __init__(self, backbone: nn.Module, preprocessing: Preprocessing, dtype: torch.dtype = torch.float32):
        super().__init__()
        self.backbone, self.preprocessing, self.dtype = backbone, preprocessing, dtype

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.backbone(_normalised(self.preprocessing, image, self.dtype))


class PrepareGraph(nn.Module):
    def __init__(self, upsampler: nn.Module, preprocessing: Preprocessing, dtype: torch.dtype = torch.float32):
        super().__init__()
        self.upsampler, self.preprocessing, self.dtype = upsampler, preprocessing, dtype

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.upsampler.prepare(_normalised(self.preprocessing, image, self.dtype))


class StepGraph(nn.Module):
    def __init__(self, upsampler: nn.Module):
        super().__init__()
        self.upsampler = upsampler

    def forward(self, state: torch.Tensor, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.upsampler.step(state, features)


class FusedGraph(nn.Module):
    """The whole extractor as one function, ``image`` -> features at its density: the shape of a
    format-1 graph, kept as the PyTorch reference of the chain and to compare formats in benchmarks."""

    def __init__(self, extractor: DenseExtractor, dtype: torch.dtype = torch.float32):
        super().__init__()
        self.extractor, self.dtype = extractor, dtype

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.extractor(_normalised(self.extractor.preprocessing, image, self.dtype))


def _save(module: nn.Module, example: tuple, dynamic: dict, inputs: list[str], outputs: list[str],
          path: Path, opset: int | None) -> None:
    chatter = io.StringIO()
    try:
        with contextlib.redirect_stdout(chatter), torch.no_grad(), warnings.catch_warnings():
            # Derived dimensions (state = P x grid) make the exporter note that it renames axes.
            warnings.filterwarnings("ignore", message="# The axis name", category=UserWarning)
            program = torch.onnx.export(module, example, dynamo=True, dynamic_shapes=dynamic, input_names=inputs,
                                        output_names=outputs, opset_version=opset, verbose=False)
            program.save(str(path), external_data=False)
    except Exception as exc:
        raise ExportError(f"torch.onnx.export failed for {path.name}: {type(exc).__name__}: {str(exc)[:600]}") from exc
    logger.debug("exporter output: %s", chatter.getvalue()[-2000:])


def _image_example(multiple: int) -> torch.Tensor:
    # A non-square example grid (4 x 6 patches) keeps the exporter from specialising on a square or
    # on the backbone's native grid.
    return torch.zeros(EXAMPLE_BATCH, 4 * multiple, 6 * multiple, 3, dtype=torch.uint8)


def export_image_graph(module: nn.Module, output: str, path: Path, multiple: int, opset: int | None) -> None:
    """Write a graph of one uint8 NHWC ``image`` input (backbone, prepare) with dynamic B, H, W."""
    d = torch.export.Dim.DYNAMIC
    _save(module, (_image_example(multiple),), {"image": {0: d, 1: d, 2: d}}, [IMAGE], [output], path, opset)


def export_step_graph(module: StepGraph, channels: int, patch_size: int, dtype: torch.dtype, path: Path,
                      opset: int | None) -> None:
    """Write the step graph. The upsampler's ``state_layout(patch_size)`` says the state's channels
    and how its sides relate to the feature grid: ``(channels, scale, True)`` when they are ``scale``
    times the current grid's (LiFT's guide image, doubled each round), ``(channels, scale, False)``
    when they are fixed per image (UPLiFT's encoder maps, ``scale`` times the backbone grid),
    independent dynamic axes then."""
    state_channels, scale, follows_grid = module.upsampler.state_layout(patch_size)
    batch, rows, cols = torch.export.Dim("batch"), torch.export.Dim("rows"), torch.export.Dim("cols")
    state = torch.zeros(EXAMPLE_BATCH, state_channels, 4 * scale, 6 * scale, dtype=dtype)
    features = torch.zeros(EXAMPLE_BATCH, channels, 4, 6, dtype=dtype)
    if follows_grid:
        state_axes = {0: batch, 2: scale * rows, 3: scale * cols}
    else:
        state_axes = {0: batch, 2: torch.export.Dim("state_rows"), 3: torch.export.Dim("state_cols")}
    dynamic = {"state": state_axes, "features": {0: batch, 2: rows, 3: cols}}
    _save(module, (state, features), dynamic, [STATE, FEATURES], [NEXT_STATE, NEXT_FEATURES], path, opset)


def graph_opset(path: Path) -> int:
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    return next(int(o.version) for o in model.opset_import if o.domain in ("", "ai.onnx"))
