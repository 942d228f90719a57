"""What ``lift train`` accepts and checks before anything is loaded, and what it returns."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import Any

from lift_serve.training.data import RESIZE_MODES
from lift_serve.training.objective import DOWNSAMPLES, LOSSES

CHECKPOINT_NAME = "lift.safetensors"
RESUME_NAME = "resume.pt"
LOG_NAME = "log.jsonl"
CURVE_NAME = "loss.png"
PRECISIONS = ("fp32", "bf16", "fp16")
RESUME_FORMAT = 1
# Settings that define the training trajectory: a resumed run must use the same ones.
TRAJECTORY_KEYS = ("backbone", "imsize", "resize", "loss", "downsample", "batch_size", "world_size", "seed",
                   "augment", "upsampler", "uplift_levels")
# What a resume state saved before a key existed meant.
TRAJECTORY_DEFAULTS = {"upsampler": "lift", "uplift_levels": 2}
UPSAMPLER_KINDS = ("lift", "uplift")


class TrainError(ValueError):
    """Training cannot start as configured; the message says why and what to do."""

    user_facing = True


@dataclasses.dataclass
class TrainConfig:
    """Everything ``lift train`` accepts. ``backbone`` is a ``BackboneSpec`` dict."""

    data: str
    out: str
    backbone: dict[str, Any]
    imsize: int = 448
    epochs: int = 5
    batch_size: int = 32
    lr: float = 1e-3
    max_steps: int | None = None
    seed: int = 0
    precision: str = "fp32"
    loss: str | None = None  # None: cosine for LiFT (the paper), l2 for UPLiFT (its authors)
    downsample: str = "stride"
    resize: str = "squash"
    augment: bool = False
    workers: int = 4
    save_every: int = 1
    save_every_steps: int = 0
    resume: bool = True
    device: str = "auto"
    progress: bool = True
    upsampler: str = "lift"
    uplift_levels: int = 2  # UPLiFT: pyramid levels trained (the authors: 3 for DINOv2-S/14, 2 for DINOv3-S+/16)


@dataclasses.dataclass
class TrainResult:
    checkpoint: Path
    steps: int
    epochs_completed: int
    losses: list[float]
    skipped_files: int


def check_config(config: TrainConfig) -> None:
    """Reject impossible settings before anything is loaded."""
    if config.upsampler not in UPSAMPLER_KINDS:
        raise TrainError(f"--upsampler must be one of {UPSAMPLER_KINDS}, got {config.upsampler!r}")
    if not 1 <= config.uplift_levels <= 4:
        raise TrainError(f"--uplift-levels must be between 1 and 4, got {config.uplift_levels}")
    # The patch size as the timm name states it (``patch14``), so that a wrong --imsize is refused
    # before any weights are fetched; build_models checks again against the network itself.
    named = re.search(r"patch(\d+)", str(config.backbone.get("name", "")))
    check_imsize_for_patch(config.imsize, int(named.group(1)) if named else 16, levels_of(config))
    for name in ("epochs", "batch_size", "save_every"):
        if getattr(config, name) < 1:
            raise TrainError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(config, name)}")
    if config.max_steps is not None and config.max_steps < 1:
        raise TrainError(f"--max-steps must be >= 1, got {config.max_steps}")
    if not config.lr > 0:
        raise TrainError(f"--lr must be > 0, got {config.lr}")
    if config.workers < 0 or config.save_every_steps < 0:
        raise TrainError("--workers and --save-every-steps must be >= 0")
    if config.precision not in PRECISIONS:
        raise TrainError(f"--precision must be one of {PRECISIONS}, got {config.precision!r}")
    if config.loss is not None and config.loss not in LOSSES:
        raise TrainError(f"--loss must be one of {LOSSES}, got {config.loss!r}")
    if config.downsample not in DOWNSAMPLES:
        raise TrainError(f"--downsample must be one of {DOWNSAMPLES}, got {config.downsample!r}")
    if config.resize not in RESIZE_MODES:
        raise TrainError(f"--resize must be one of {RESIZE_MODES}, got {config.resize!r}")


def levels_of(config: TrainConfig) -> int:
    """Halvings of the image the objective feeds the backbone: 2 for LiFT's Eq. 1 (x/2, x/4), the
    configured pyramid depth for UPLiFT."""
    return config.uplift_levels if config.upsampler == "uplift" else 2


def resolved_loss(config: TrainConfig) -> str:
    return config.loss or ("l2" if config.upsampler == "uplift" else "cosine")


def smallest_imsize(at_least: int, patch_size: int, levels: int = 2) -> int:
    """The smallest valid training size (see :func:`check_imsize_for_patch`) not below ``at_least``."""
    factor = 2 ** levels * patch_size
    return -(-at_least // factor) * factor


def check_imsize_for_patch(imsize: int, patch_size: int, levels: int = 2) -> None:
    """The objective feeds the backbone x/2 ... x/2^levels (Eq. 1: x/4), whose sides must be whole
    patches: --imsize must be a multiple of 2^levels x the patch size (for Eq. 1: 64 for patch 16,
    56 for 14, 32 for 8)."""
    factor = 2 ** levels
    if imsize < factor * patch_size or imsize % (factor * patch_size):
        lower = max(factor * patch_size, imsize // (factor * patch_size) * factor * patch_size)
        raise TrainError(
            f"--imsize {imsize} does not fit patch size {patch_size}: training also feeds the backbone x/{factor}, "
            f"which must be a whole number of patches, so --imsize must be a multiple of {factor}x the patch size, "
            f"{factor * patch_size} (e.g. {lower} or {lower + factor * patch_size})")


