"""What a run leaves behind so it can be resumed: the checkpoint (``model.checkpoint``) and
``resume.pt`` (optimizer, scaler, position, RNG states, the settings that define the trajectory),
each written atomically; a resumed run with other settings is refused."""

from __future__ import annotations

import dataclasses
import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
from lift_serve.model.checkpoint import CheckpointMeta, save_lift_checkpoint
from lift_serve.training.config import (
    CHECKPOINT_NAME,
    RESUME_FORMAT,
    RESUME_NAME,
    TRAJECTORY_DEFAULTS,
    TRAJECTORY_KEYS,
    TrainConfig,
    TrainError,
    resolved_loss,
)


def rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


def trajectory_of(config: TrainConfig, world_size: int) -> dict[str, Any]:
    values = dataclasses.asdict(config) | {"world_size": world_size}
    return {key: values[key] for key in TRAJECTORY_KEYS}


def load_resume_state(out: Path, expected: dict[str, Any]) -> dict[str, Any] | None:
    """The saved state in ``out``, or None; raises if it belongs to a differently configured run."""
    path = out / RESUME_NAME
    if not path.is_file():
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:  # a damaged file: say so instead of guessing
        raise TrainError(f"cannot read the resume state {path} ({exc}); delete it or pass --no-resume") from None
    if state.get("format") != RESUME_FORMAT:
        raise TrainError(f"{path} has resume format {state.get('format')}, expected {RESUME_FORMAT}; "
                         "pass --no-resume or another --out")
    saved = {**TRAJECTORY_DEFAULTS, **state["trajectory"]}
    differing = {k: (saved.get(k), v) for k, v in expected.items() if saved.get(k) != v}
    if differing:
        shown = "; ".join(f"{k}: saved {a!r}, now {b!r}" for k, (a, b) in differing.items())
        raise TrainError(f"--out {out} holds a run with different settings ({shown}). Resume it with the "
                         "same settings, start over with --no-resume, or choose another --out")
    return state


def write_atomic_torch(obj: Any, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def save_checkpoint_and_state(config, out, lift, step_fn, dist, trajectory, step, epoch, batch_in_epoch,
                              completed_epochs, last_loss, skipped, dataset_size, backbone) -> Path:
    """Rank 0 writes the checkpoint, then the resume state (both atomically)."""
    path = out / CHECKPOINT_NAME
    if not dist.is_main:
        return path
    meta = CheckpointMeta(
        backbone=backbone.spec.to_dict(), channels=lift.in_channels, patch_size=lift.patch_size,
        mean=list(backbone.mean), std=list(backbone.std), image_size=config.imsize,
        epochs=completed_epochs, steps=step, loss=resolved_loss(config), upsampler=lift.kind,
        extra={"downsample": config.downsample, "resize": config.resize, "lr": config.lr,
               "batch_size": config.batch_size,
               "world_size": dist.world_size, "seed": config.seed, "augment": config.augment,
               "precision": config.precision, "last_loss": last_loss, "dataset_size": dataset_size,
               "skipped_files": len(skipped)})
    save_lift_checkpoint(path, lift, meta)
    write_atomic_torch({
        "format": RESUME_FORMAT, "trajectory": trajectory, "step": step, "epoch": epoch,
        "batch_in_epoch": batch_in_epoch, "lift": {k: v.detach().cpu() for k, v in lift.state_dict().items()},
        "optimizer": step_fn.optimizer.state_dict(), "scaler": step_fn.scaler.state_dict(),
        "rng": rng_state(), "skipped": skipped, "dataset_size": dataset_size,
    }, out / RESUME_NAME)
    return path
