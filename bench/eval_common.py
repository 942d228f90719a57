"""What every ``lift eval`` command shares: feature methods, feature sources, images, JSON output.

A **feature function** is the one thing an evaluation needs from a model::

    FeatureFn = Callable[[np.ndarray], np.ndarray]
    # uint8 RGB image [H, W, 3] (pixels 0..255) -> float32 features [C, h, w]

Cell ``(i, j)`` of the result covers input pixels ``[i*s, (i+1)*s) x [j*s, (j+1)*s)`` with stride
``s = H / h``. Evaluations take feature functions, not models, so tests can plant a perfect or a
deliberately wrong matcher, and the same harness runs on PyTorch weights or on an exported ONNX
bundle.

A **method** names how the features are made densified, as ``kind[:k]``:

* ``backbone`` -- the ViT's patch features (stride P);
* ``bilinear:k`` -- backbone features bilinearly resized by 2^k (the baseline);
* ``lift:k`` -- k rounds of LiFT (``lift`` = ``lift:1``).

Torch is imported lazily, inside the functions that need it, so ``lift --help`` stays torch-free.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

FeatureFn = Callable[[np.ndarray], np.ndarray]
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")
METHOD_KINDS = ("backbone", "bilinear", "lift")


class EvalError(ValueError):
    """An evaluation cannot run as asked; the message says what is wrong and what to do."""

    user_facing = True


@dataclasses.dataclass(frozen=True)
class Method:
    """How features are densified: ``kind`` in METHOD_KINDS, ``iterations`` = k (0 for backbone)."""

    kind: str
    iterations: int = 0

    @classmethod
    def parse(cls, text: str) -> Method:
        """``backbone`` | ``bilinear[:k]`` | ``lift[:k]`` (k defaults to 1)."""
        kind, _, k = text.strip().partition(":")
        kind = kind.strip().lower()
        if kind not in METHOD_KINDS:
            raise EvalError(f"unknown method {text!r}; use backbone, bilinear[:k] or lift[:k], e.g. 'lift:2'")
        if kind == "backbone":
            if k and k != "0":
                raise EvalError(f"method {text!r}: backbone takes no iteration count")
            return cls("backbone", 0)
        try:
            iterations = int(k) if k else 1
        except ValueError:
            raise EvalError(f"method {text!r}: the iteration count after ':' must be an integer") from None
        if iterations < 1:
            raise EvalError(f"method {text!r}: the iteration count must be >= 1")
        return cls(kind, iterations)

    @property
    def name(self) -> str:
        """Machine-readable key used in JSON: ``backbone``, ``bilinear:1``, ``lift:2``."""
        return "backbone" if self.kind == "backbone" else f"{self.kind}:{self.iterations}"

    @property
    def label(self) -> str:
        """Human label for tables and plots: ``backbone``, ``bilinear x2``, ``LiFT``, ``2xLiFT``."""
        if self.kind == "backbone":
            return "backbone"
        if self.kind == "bilinear":
            return f"bilinear x{2 ** self.iterations}"
        return "LiFT" if self.iterations == 1 else f"{self.iterations}xLiFT"

    @property
    def scale(self) -> int:
        """Output grid / patch grid."""
        return 2**self.iterations


def parse_methods(text: str) -> list[Method]:
    """Comma-separated method list -> methods, duplicates removed, order kept."""
    methods: list[Method] = []
    for part in text.split(","):
        if part.strip():
            method = Method.parse(part)
            if method not in methods:
                methods.append(method)
    if not methods:
        raise EvalError("no methods given; e.g. --methods backbone,bilinear:1,lift:1")
    return methods


def parse_float_list(text: str, option: str) -> list[float]:
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise EvalError(f"{option} takes comma-separated numbers, got {text!r}") from None
    if not values or any(not math.isfinite(v) or v <= 0 for v in values):
        raise EvalError(f"{option} needs positive numbers, got {text!r}")
    return values


# -- images -------------------------------------------------------------------------------------


def list_images(folder: str | Path) -> list[Path]:
    """Image files under ``folder`` (recursive), sorted so that runs are reproducible."""
    folder = Path(folder)
    if not folder.is_dir():
        raise EvalError(f"image folder {folder} does not exist; pass --images with a folder of photos")
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not files:
        raise EvalError(f"no images ({', '.join(IMAGE_SUFFIXES)}) found under {folder}")
    return files


def load_rgb(path: str | Path):
    """Open an image file as an RGB PIL image, or raise EvalError naming the file."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except FileNotFoundError:
        raise EvalError(f"image file {path} does not exist") from None
    except (UnidentifiedImageError, OSError) as exc:
        raise EvalError(f"cannot read image {path}: {exc}") from None


def square_crop(image, size: int) -> np.ndarray:
    """Centre-crop the largest square and resize it to ``size`` x ``size`` (Lanczos); uint8 [S,S,3]."""
    from PIL import Image, ImageOps

    return np.asarray(ImageOps.fit(image, (size, size), Image.Resampling.LANCZOS), dtype=np.uint8)


# -- feature sources ----------------------------------------------------------------------------


def upsample_features(features: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Bilinear resize (align_corners=False) of [C, h, w] features to [C, *size] float32."""
    import torch
    import torch.nn.functional as F

    tensor = torch.from_numpy(np.ascontiguousarray(features, dtype=np.float32))[None]
    return F.interpolate(tensor, size=size, mode="bilinear", align_corners=False)[0].numpy()


class TorchFeatureSource:
    """Feature functions from PyTorch: one backbone (+ optional LiFT) shared by all methods.

    Args:
        spec: BackboneSpec, or None to take it from our checkpoint's sidecar.
        checkpoint: LiFT checkpoint path, or None (then only backbone/bilinear methods work).
    """

    def __init__(self, spec, checkpoint: str | Path | None):
        from lift_serve.model.factory import load_backbone_and_lift

        self.backbone, self.lift, self.meta = load_backbone_and_lift(spec, checkpoint)
        self.checkpoint = str(checkpoint) if checkpoint is not None else None
        self.patch_size = self.backbone.patch_size

    def feature_fn(self, method: Method) -> FeatureFn:
        import torch
        from lift_serve.model.extractor import DenseExtractor

        if method.kind == "lift" and self.lift is None:
            raise EvalError(f"method {method.name} needs LiFT weights: pass --checkpoint (or --bundle)")
        upsample = "bilinear" if method.kind == "bilinear" else "lift"
        extractor = DenseExtractor(self.backbone, self.lift, method.iterations, upsample).eval()

        def features(image: np.ndarray) -> np.ndarray:
            extractor.preprocessing.check_size(*image.shape[:2])
            pixels = torch.tensor(image, dtype=torch.uint8).permute(2, 0, 1)[None]  # copy: inputs may be read-only
            with torch.inference_mode():
                return extractor(extractor.preprocessing.normalize(pixels))[0].float().numpy()

        return features

    def describe(self) -> dict[str, Any]:
        return {"source": "pytorch", "backbone": self.backbone.spec.to_dict(), "checkpoint": self.checkpoint,
                "patch_size": self.patch_size, "channels": self.backbone.embed_dim}


class BundleFeatureSource:
    """Feature functions from an exported ONNX bundle (``service.runtime.open_runtime``).

    ``lift:k`` runs the bundle's backbone and k upsampler steps, ``backbone`` the backbone alone, and
    ``bilinear:k`` bilinearly resizes the backbone's output; each needs that density in the bundle.
    Inputs must have one of the bundle's exported sizes.
    """

    def __init__(self, bundle_dir: str | Path):
        from lift_serve.service.runtime import open_runtime

        self.bundle_dir = str(bundle_dir)
        self.runtime = open_runtime(bundle_dir, providers=("cuda", "cpu"))
        self.patch_size = self.runtime.patch_size

    def _graph(self, iterations: int, method: Method) -> int:
        if iterations not in self.runtime.iterations:
            raise EvalError(
                f"method {method.name} needs {iterations} LiFT iterations, but "
                f"{self.bundle_dir} offers {self.runtime.iterations}; re-export with that iteration count"
            )
        return iterations

    def feature_fn(self, method: Method) -> FeatureFn:
        k = self._graph(0 if method.kind in ("backbone", "bilinear") else method.iterations, method)

        def features(image: np.ndarray) -> np.ndarray:
            h, w = image.shape[:2]
            if (h, w) not in self.runtime.sizes:
                raise EvalError(
                    f"the bundle {self.bundle_dir} supports input sizes {self.runtime.sizes}, not {h}x{w}; "
                    "choose a supported --size or export the bundle for this size"
                )
            out = self.runtime.run(image[None], iterations=k)[0].astype(np.float32)
            if method.kind == "bilinear":
                out = upsample_features(out, (out.shape[1] * method.scale, out.shape[2] * method.scale))
            return out

        return features

    def describe(self) -> dict[str, Any]:
        return {"source": "bundle", "bundle": self.bundle_dir, "manifest": self.runtime.manifest.model_dump()}


def add_source_arguments(parser: argparse.ArgumentParser) -> None:
    """--checkpoint / --bundle plus the backbone options (torch-free)."""
    from lift_serve.model.options import add_backbone_arguments, add_checkpoint_argument

    add_checkpoint_argument(parser)
    parser.add_argument("--bundle", default=None, metavar="DIR",
                        help="evaluate an exported ONNX bundle instead of PyTorch weights (a directory or "
                             "hf://ORG/NAME[@REVISION][/PATH])")
    add_backbone_arguments(parser)


def check_size(size: int, patch_size: int) -> None:
    """Raise EvalError unless ``size`` (the --size option) is a positive multiple of the patch size."""
    if size < patch_size or size % patch_size:
        raise EvalError(f"--size {size} is not a positive multiple of the patch size {patch_size}")


def open_feature_source(args: argparse.Namespace):
    """TorchFeatureSource or BundleFeatureSource from --checkpoint/--bundle and the backbone options.

    With our ``.safetensors`` checkpoint the backbone comes from its sidecar (the backbone options
    are ignored); otherwise (no checkpoint, or an authors' ``.pth``) from the backbone options.
    """
    from lift_serve.hub.refs import resolve_directory
    from lift_serve.model.backbone import BackboneSpec
    from lift_serve.model.options import backbone_spec_dict, resolve_checkpoint_option

    if args.bundle and args.checkpoint:
        raise EvalError("pass either --checkpoint or --bundle, not both")
    resolve_checkpoint_option(args)
    if args.bundle:
        args.bundle = str(resolve_directory(args.bundle))
        if not Path(args.bundle).is_dir():
            raise EvalError(f"bundle directory {args.bundle} does not exist; export one with `lift export`")
        return BundleFeatureSource(args.bundle)
    spec = None
    if args.checkpoint is None or Path(args.checkpoint).suffix != ".safetensors":
        spec = BackboneSpec.from_dict(backbone_spec_dict(args))
    return TorchFeatureSource(spec, args.checkpoint)


# -- output -------------------------------------------------------------------------------------


def write_json(path: str | Path, data: dict[str, Any]) -> Path:
    """Write ``data`` as indented JSON, creating parent folders."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2) + "\n")
    return path


def add_output_arguments(parser: argparse.ArgumentParser, default_out: str) -> None:
    parser.add_argument("--out", default=default_out, metavar="JSON",
                        help="where to write the results (default: %(default)s)")
    parser.add_argument("--plot", default=None, metavar="PNG",
                        help="where to write the plot (default: the --out path with .png)")
    parser.add_argument("--no-plot", action="store_true", help="write the JSON only")


def plot_path(args: argparse.Namespace) -> Path | None:
    if args.no_plot:
        return None
    return Path(args.plot) if args.plot else Path(args.out).with_suffix(".png")


def finish_report(args: argparse.Namespace, report: dict[str, Any], summary: str,
                  plot: Callable[[dict[str, Any], Path], Any]) -> int:
    """The common end of every ``lift eval`` command: write ``report`` to --out, print ``summary``,
    draw ``plot(report, png)`` unless --no-plot; returns the exit status 0."""
    write_json(args.out, report)
    print(summary)
    png = plot_path(args)
    if png is not None:
        plot(report, png)
        print(f"plot -> {png}")
    return 0


def percent(values: Sequence[bool] | np.ndarray) -> float:
    """Share of true values in percent (0 for an empty list)."""
    values = np.asarray(values, dtype=bool)
    return float(100.0 * values.mean()) if values.size else 0.0
