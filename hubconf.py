"""``torch.hub.load("OWNER/lift-serve", NAME)``: the PyTorch extractor of a named model.

Each entry point returns a :class:`lift_serve.model.extractor.DenseExtractor` in eval mode (backbone
from timm's hub, upsampler weights from the model's release; ``pretrained=False`` builds both with
random weights and downloads nothing). ``lift models`` lists the names; dashes become underscores
here, e.g. ``uplift_dinov2_s14``. Arguments: ``pretrained``, ``checkpoint`` (a path or
``hf://`` reference; required for the LiFT models, whose authors publish their weights outside the
Hub), ``iterations`` (upsampler steps, default the model's densest) and ``out_size`` (an exact
``(height, width)`` output grid).

torch.hub puts this repository on ``sys.path`` without installing it; the folders are mapped onto
the ``lift_serve`` namespace here the way ``pyproject.toml`` maps them for an installed package.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

dependencies = ["torch", "timm", "huggingface_hub", "safetensors"]

_ROOT = Path(__file__).resolve().parent
_FOLDERS = {"lift_serve": "lift_serve", "lift_serve.bundle": "bundle", "lift_serve.hub": "hub",
            "lift_serve.model": "model"}


def _import_package() -> None:
    try:
        importlib.import_module("lift_serve.model.named")
        return
    except ImportError:
        pass
    for name, folder in _FOLDERS.items():
        if name in sys.modules:
            continue
        spec = importlib.util.spec_from_file_location(name, _ROOT / folder / "__init__.py",
                                                      submodule_search_locations=[str(_ROOT / folder)])
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)


def _entry(name: str):
    def load(pretrained: bool = True, checkpoint: str | None = None, iterations: int | None = None,
             out_size: tuple[int, int] | None = None):
        _import_package()
        from lift_serve.hub.models import named_model
        from lift_serve.model.named import extractor

        return extractor(named_model(name), pretrained=pretrained, checkpoint=checkpoint, iterations=iterations,
                         out_size=out_size)

    load.__name__ = name.replace("-", "_")
    load.__doc__ = f"The {name} extractor (see the module docstring for the arguments)."
    return load


uplift_dinov2_s14 = _entry("uplift-dinov2-s14")
uplift_dinov3_splus16 = _entry("uplift-dinov3-splus16")
lift_dino_vits16 = _entry("lift-dino-vits16")
lift_dino_vits8 = _entry("lift-dino-vits8")
lift_dino_vitb16 = _entry("lift-dino-vitb16")
lift_dino_vitb8 = _entry("lift-dino-vitb8")
