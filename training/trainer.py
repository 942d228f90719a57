"""The LiFT training loop: Eq. 1 (``training.objective``), Adam, optional AMP, resumable, DDP-ready.

Files written into ``out`` (only by rank 0):

* ``lift.safetensors`` + ``lift.json``: the newest checkpoint in our format (``model.checkpoint``);
  rewritten atomically every ``save_every`` epochs (and ``save_every_steps`` steps, if set) and at
  the end. The sidecar records the backbone spec, so export rebuilds the identical backbone.
* ``resume.pt``: everything else a resumed run needs (LiFT and optimizer state, GradScaler, epoch,
  position inside the epoch, global step, RNG states, the settings that define the trajectory),
  written atomically next to each checkpoint. With ``resume=True`` (default) a run whose ``out``
  holds one continues from it, so an interruption loses at most one save interval.
* ``log.jsonl``: one record per step ``{"step", "epoch", "loss", "loss_x2", "loss_x4", "lr",
  "images_per_s", "time"}`` and one per epoch ``{"event": "epoch", ...}`` with the skipped-file count.
  ``images_per_s`` counts images of all ranks per second of wall time, data loading included.
* ``loss.png``: the loss curve, drawn at the end.

Determinism: LiFT's initialisation is seeded by ``seed``; the data order by ``(seed, epoch)``
(``ShardSampler``) and the colour jitter by ``(seed, epoch, index)`` (``ImageFolderDataset``), so
they do not depend on RNG state at all; a resumed run skips the batches already seen in its epoch
and reaches the same weights as an uninterrupted one on the CPU (bit-for-bit in the tests). Global
RNG states are saved and restored as well. On CUDA, cuDNN's algorithm choice can make the last bits
differ between runs.

Distributed: under ``torchrun`` (``WORLD_SIZE`` > 1) LiFT is wrapped in DistributedDataParallel
(NCCL on CUDA, gloo on the CPU); every rank reads its shard of each epoch; ``batch_size`` is per
rank, so one optimizer step consumes ``batch_size * world_size`` images. BatchNorm statistics are
per rank (plain BatchNorm, as the authors), and rank 0's buffers are broadcast at each forward.
Every rank reads ``resume.pt`` when resuming, so ``out`` must be on a filesystem all ranks see
(always true on one machine).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import random
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from lift_serve.model.backbone import BackboneSpec, ViTBackbone
from lift_serve.model.checkpoint import CheckpointMeta, save_lift_checkpoint
from lift_serve.model.extractor import Preprocessing
from lift_serve.model.lift import LiFT
from lift_serve.training.data import RESIZE_MODES, ImageFolderDataset, ShardSampler, collate_images, scan_image_folder
from lift_serve.training.objective import DOWNSAMPLES, LOSSES, TwoOctaveLiFT, reconstruction_loss

CHECKPOINT_NAME = "lift.safetensors"
RESUME_NAME = "resume.pt"
LOG_NAME = "log.jsonl"
CURVE_NAME = "loss.png"
PRECISIONS = ("fp32", "bf16", "fp16")
RESUME_FORMAT = 1
# Settings that define the training trajectory: a resumed run must use the same ones.
TRAJECTORY_KEYS = ("backbone", "imsize", "resize", "loss", "downsample", "batch_size", "world_size", "seed",
                   "augment")


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
    loss: str = "cosine"
    downsample: str = "stride"
    resize: str = "squash"
    augment: bool = False
    workers: int = 4
    save_every: int = 1
    save_every_steps: int = 0
    resume: bool = True
    device: str = "auto"
    progress: bool = True


@dataclasses.dataclass
class TrainResult:
    checkpoint: Path
    steps: int
    epochs_completed: int
    losses: list[float]
    skipped_files: int


def check_config(config: TrainConfig) -> None:
    """Reject impossible settings before anything is loaded."""
    if config.imsize < 64 or config.imsize % 32:
        raise TrainError(
            f"--imsize {config.imsize} does not work: Eq. 1 also feeds the backbone x/4, whose sides "
            "must be multiples of the patch size, so --imsize must be a multiple of 4x the patch size "
            "(64 for patch 16, 32 for patch 8), e.g. 448 (the authors' choice) or 224")
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
    if config.loss not in LOSSES:
        raise TrainError(f"--loss must be one of {LOSSES}, got {config.loss!r}")
    if config.downsample not in DOWNSAMPLES:
        raise TrainError(f"--downsample must be one of {DOWNSAMPLES}, got {config.downsample!r}")
    if config.resize not in RESIZE_MODES:
        raise TrainError(f"--resize must be one of {RESIZE_MODES}, got {config.resize!r}")


def check_imsize_for_patch(imsize: int, patch_size: int) -> None:
    if imsize < 4 * patch_size or imsize % (4 * patch_size):
        lower = max(4 * patch_size, imsize // (4 * patch_size) * 4 * patch_size)
        raise TrainError(
            f"--imsize {imsize} does not fit patch size {patch_size}: x/4 must be a whole number of "
            f"patches, so --imsize must be a multiple of {4 * patch_size} (e.g. {lower} or "
            f"{lower + 4 * patch_size})")


@dataclasses.dataclass
class _Dist:
    world_size: int = 1
    rank: int = 0
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _setup_distributed(device_arg: str) -> _Dist:
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device_arg == "auto":
        use_cuda = torch.cuda.is_available()
    elif device_arg in ("cuda", "cpu"):
        use_cuda = device_arg == "cuda"
        if use_cuda and not torch.cuda.is_available():
            raise TrainError("--device cuda was asked for but no CUDA device is available; use --device cpu")
    else:
        raise TrainError(f"--device must be auto, cuda or cpu, got {device_arg!r}")
    device = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    if world_size > 1 and not torch.distributed.is_initialized():
        torch.distributed.init_process_group("nccl" if use_cuda else "gloo")
    return _Dist(world_size, rank, local_rank, device)


def _autocast(precision: str, device: torch.device):
    if precision == "fp32":
        return torch.autocast(device.type, enabled=False)
    if precision == "fp16" and device.type != "cuda":
        raise TrainError("--precision fp16 needs a CUDA device (fp16 autocast with loss scaling); "
                         "on the CPU use --precision bf16 or fp32")
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device.type, dtype=dtype)


def _rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


def _trajectory(config: TrainConfig, world_size: int) -> dict[str, Any]:
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
    differing = {k: (state["trajectory"].get(k), v) for k, v in expected.items() if state["trajectory"].get(k) != v}
    if differing:
        shown = "; ".join(f"{k}: saved {a!r}, now {b!r}" for k, (a, b) in differing.items())
        raise TrainError(f"--out {out} holds a run with different settings ({shown}). Resume it with the "
                         "same settings, start over with --no-resume, or choose another --out")
    return state


def _write_atomic_torch(obj: Any, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


class _Logger:
    """Rank-0 console lines (through tqdm so bars stay intact) and the JSONL log."""

    def __init__(self, out: Path, enabled: bool, resume_step: int | None):
        self.enabled = enabled
        self.path = out / LOG_NAME
        if not enabled:
            return
        kept = []
        if resume_step is not None and self.path.is_file():
            # Steps after the saved state are about to be redone: drop them so the log has no repeats.
            for line in self.path.read_text().splitlines():
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    continue
                if record.get("step", 0) <= resume_step:
                    kept.append(line)
        self.path.write_text("".join(line + "\n" for line in kept))

    def say(self, message: str) -> None:
        if self.enabled:
            from tqdm import tqdm

            tqdm.write(message, file=sys.stderr)

    def record(self, record: dict[str, Any]) -> None:
        if self.enabled:
            with open(self.path, "a") as handle:
                handle.write(json.dumps(record) + "\n")


def plot_loss_curve(log_path: Path, png_path: Path) -> Path | None:
    """Draw loss per step (and a moving average) from ``log.jsonl`` into a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = [json.loads(line) for line in log_path.read_text().splitlines() if line.strip()]
    steps = [r["step"] for r in records if "loss" in r and "event" not in r]
    losses = [r["loss"] for r in records if "loss" in r and "event" not in r]
    if not steps:
        return None
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    ax.plot(steps, losses, lw=0.8, alpha=0.5, label="loss per step")
    window = max(1, len(losses) // 50)
    if window > 1:
        smooth = np.convolve(losses, np.ones(window) / window, mode="valid")
        ax.plot(steps[window - 1:], smooth, lw=1.5, label=f"moving average ({window} steps)")
    ax.set_xlabel("step")
    ax.set_ylabel("Eq. 1 loss")
    ax.set_title("LiFT training")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(png_path)
    plt.close(fig)
    return png_path


def build_models(spec_dict: dict[str, Any], imsize: int, seed: int) -> tuple[ViTBackbone, LiFT]:
    """Frozen backbone and a freshly initialised LiFT (init seeded by ``seed``)."""
    spec = BackboneSpec.from_dict(spec_dict)
    backbone = ViTBackbone.from_spec(spec)
    check_imsize_for_patch(imsize, backbone.patch_size)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        lift = LiFT(backbone.embed_dim, backbone.patch_size)
    return backbone, lift


class TrainStep:
    """One optimisation step of Eq. 1; shared by the trainer and ``lift bench train``.

    Args:
        backbone: the frozen ViT (on ``device``).
        lift_pair: :class:`TwoOctaveLiFT` (or its DDP wrapper) in train mode.
        preprocessing: the backbone's normalisation.
    """

    def __init__(self, backbone, lift_pair, preprocessing: Preprocessing, lr: float, precision: str,
                 loss: str, downsample: str, device: torch.device):
        self.backbone, self.lift_pair, self.preprocessing = backbone, lift_pair, preprocessing
        self.loss, self.downsample, self.device, self.precision = loss, downsample, device, precision
        _autocast(precision, device)  # validates precision for the device before any work
        self.optimizer = torch.optim.Adam(lift_pair.parameters(), lr=lr)
        self.scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")

    def __call__(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """images: [B,3,S,S] RGB, uint8 0..255 or float 0..1, any device.

        Returns detached (loss, term x/2->x, term x/4->x/2)."""
        images = self.preprocessing.normalize(images.to(self.device, non_blocking=True))
        with _autocast(self.precision, self.device):
            loss, (term_full, term_half) = reconstruction_loss(
                self.backbone, self.lift_pair, images, self.loss, self.downsample)
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        return loss.detach(), term_full, term_half


def train(config: TrainConfig) -> TrainResult:
    """Run (or resume) training as configured; see the module docstring for the files written."""
    check_config(config)
    out = Path(config.out).expanduser()
    if out.exists() and not out.is_dir():
        raise TrainError(f"--out {out} is a file; pass a folder for the checkpoint, resume state and log")
    scan = scan_image_folder(config.data)  # a missing or empty folder fails before any model is built
    dist = _setup_distributed(config.device)
    try:
        return _train(config, out, scan, dist)
    finally:
        if dist.world_size > 1 and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def _train(config: TrainConfig, out: Path, scan, dist: _Dist) -> TrainResult:
    if dist.is_main:
        out.mkdir(parents=True, exist_ok=True)
    _autocast(config.precision, dist.device)
    trajectory = _trajectory(config, dist.world_size)
    state = load_resume_state(out, trajectory) if config.resume else None
    logger = _Logger(out, dist.is_main, state["step"] if state else None)
    if scan.unreadable or scan.ignored:
        logger.say(f"data: skipped {len(scan.unreadable)} files that are not readable images"
                   + (f" (e.g. {scan.unreadable[0]})" if scan.unreadable else "")
                   + f"; ignored {scan.ignored} files without an image extension")

    backbone, lift = build_models(config.backbone, config.imsize, config.seed)
    if state is not None:
        lift.load_state_dict(state["lift"])  # before DDP wraps it; every rank reads the same file
    backbone.to(dist.device)
    lift.to(dist.device).train()
    lift_pair = TwoOctaveLiFT(lift)
    if dist.world_size > 1:
        from torch.nn.parallel import DistributedDataParallel

        ids = [dist.device.index] if dist.device.type == "cuda" else None
        lift_pair = DistributedDataParallel(lift_pair, device_ids=ids)
    preprocessing = Preprocessing(backbone.mean, backbone.std, backbone.patch_size)
    step_fn = TrainStep(backbone, lift_pair, preprocessing, config.lr, config.precision, config.loss,
                        config.downsample, dist.device)

    dataset = ImageFolderDataset(scan.paths, config.imsize, config.augment, config.seed, config.resize)
    per_rank = math.ceil(len(dataset) / dist.world_size)
    steps_per_epoch = math.ceil(per_rank / config.batch_size)
    step, epoch, batch_in_epoch = 0, 0, 0
    skipped_paths: set[str] = set(map(str, scan.unreadable))
    if state is not None:
        step_fn.optimizer.load_state_dict(state["optimizer"])
        if state.get("scaler"):
            step_fn.scaler.load_state_dict(state["scaler"])
        _set_rng_state(state["rng"])
        step, epoch, batch_in_epoch = state["step"], state["epoch"], state["batch_in_epoch"]
        skipped_paths |= set(state.get("skipped", []))
        if state.get("dataset_size") != len(dataset):
            logger.say(f"warning: the data folder now has {len(dataset)} images, the saved run had "
                       f"{state.get('dataset_size')}; the data order after resuming differs from an "
                       "uninterrupted run")
        logger.say(f"resuming from {out / RESUME_NAME}: step {step}, epoch {epoch + 1}, "
                   f"batch {batch_in_epoch}/{steps_per_epoch}")
    if batch_in_epoch >= steps_per_epoch:
        epoch, batch_in_epoch = epoch + 1, 0
    logger.say(f"training LiFT({lift.in_channels}, {lift.patch_size}) on {len(dataset)} images, "
               f"{steps_per_epoch} steps/epoch x {config.epochs} epochs, {dist.world_size} process(es) "
               f"on {dist.device}, precision {config.precision}")

    def save(completed_epochs: int) -> Path:
        return _save(config, out, lift, step_fn, dist, trajectory, step, epoch_pos, batch_pos, completed_epochs,
                     losses[-1] if losses else None, sorted(skipped_paths), len(dataset), backbone)

    losses: list[float] = []
    checkpoint = out / CHECKPOINT_NAME
    saved_at = None
    stop = config.max_steps is not None and step >= config.max_steps
    epoch_pos, batch_pos = epoch, batch_in_epoch
    while epoch < config.epochs and not stop:
        dataset.set_epoch(epoch)
        sampler = ShardSampler(len(dataset), dist.world_size, dist.rank, config.seed, epoch,
                               skip=batch_in_epoch * config.batch_size)
        loader = torch.utils.data.DataLoader(
            dataset, batch_size=config.batch_size, sampler=sampler, num_workers=config.workers,
            collate_fn=collate_images, pin_memory=dist.device.type == "cuda",
            prefetch_factor=4 if config.workers else None)
        from tqdm import tqdm

        bar = tqdm(total=steps_per_epoch, initial=batch_in_epoch, desc=f"epoch {epoch + 1}/{config.epochs}",
                   disable=not (dist.is_main and config.progress), dynamic_ncols=True, file=sys.stderr)
        tick = time.perf_counter()
        for images, skipped in loader:
            loss, term_full, term_half = step_fn(images)
            values = torch.stack([loss, term_full, term_half]).float()
            if dist.world_size > 1:
                torch.distributed.all_reduce(values)
                values /= dist.world_size
            loss_value, full_value, half_value = values.tolist()
            step += 1
            batch_in_epoch += 1
            epoch_pos, batch_pos = epoch, batch_in_epoch
            now = time.perf_counter()
            rate = images.shape[0] * dist.world_size / max(now - tick, 1e-9)
            tick = now
            losses.append(loss_value)
            skipped_paths.update(skipped)
            logger.record({"step": step, "epoch": epoch + 1, "loss": loss_value, "loss_x2": full_value,
                           "loss_x4": half_value, "lr": step_fn.optimizer.param_groups[0]["lr"],
                           "images_per_s": rate, "time": time.time()})
            bar.set_postfix(loss=f"{loss_value:.4f}", img_s=f"{rate:.1f}")
            bar.update()
            if config.max_steps is not None and step >= config.max_steps:
                stop = True
                break
            if config.save_every_steps and step % config.save_every_steps == 0:
                checkpoint, saved_at = save(epoch), step
        bar.close()
        epoch_done = batch_in_epoch >= steps_per_epoch
        if epoch_done:
            skipped_total = _global_count(len(skipped_paths), dist)
            logger.record({"event": "epoch", "epoch": epoch + 1, "step": step,
                           "mean_loss": float(np.mean(losses[-steps_per_epoch:])) if losses else None,
                           "skipped_files": skipped_total, "ignored_files": scan.ignored})
            if skipped_total:
                logger.say(f"epoch {epoch + 1}: skipped {skipped_total} unreadable or truncated files so far")
            epoch, batch_in_epoch = epoch + 1, 0
            epoch_pos, batch_pos = epoch, 0
            if epoch % config.save_every == 0 or epoch == config.epochs:
                checkpoint, saved_at = save(epoch), step
    if (losses and saved_at != step) or not checkpoint.is_file():  # nothing new after a finished run: keep it
        checkpoint = save(epoch)
    if dist.is_main:
        curve = plot_loss_curve(out / LOG_NAME, out / CURVE_NAME)
        logger.say(f"done: step {step}, {epoch} epoch(s) completed; checkpoint {checkpoint}"
                   + (f", loss curve {curve}" if curve else ""))
    if dist.world_size > 1:
        torch.distributed.barrier()
    return TrainResult(checkpoint, step, epoch, losses, len(skipped_paths))


def _global_count(count: int, dist: _Dist) -> int:
    if dist.world_size == 1:
        return count
    value = torch.tensor([count], dtype=torch.long, device=dist.device)
    torch.distributed.all_reduce(value)
    return int(value.item())


def _save(config, out, lift, step_fn, dist, trajectory, step, epoch, batch_in_epoch, completed_epochs,
          last_loss, skipped, dataset_size, backbone) -> Path:
    """Rank 0 writes the checkpoint, then the resume state (both atomically)."""
    path = out / CHECKPOINT_NAME
    if not dist.is_main:
        return path
    meta = CheckpointMeta(
        backbone=backbone.spec.to_dict(), channels=lift.in_channels, patch_size=lift.patch_size,
        mean=list(backbone.mean), std=list(backbone.std), image_size=config.imsize,
        epochs=completed_epochs, steps=step, loss=config.loss,
        extra={"downsample": config.downsample, "resize": config.resize, "lr": config.lr,
               "batch_size": config.batch_size,
               "world_size": dist.world_size, "seed": config.seed, "augment": config.augment,
               "precision": config.precision, "last_loss": last_loss, "dataset_size": dataset_size,
               "skipped_files": len(skipped)})
    save_lift_checkpoint(path, lift, meta)
    _write_atomic_torch({
        "format": RESUME_FORMAT, "trajectory": trajectory, "step": step, "epoch": epoch,
        "batch_in_epoch": batch_in_epoch, "lift": {k: v.detach().cpu() for k, v in lift.state_dict().items()},
        "optimizer": step_fn.optimizer.state_dict(), "scaler": step_fn.scaler.state_dict(),
        "rng": _rng_state(), "skipped": skipped, "dataset_size": dataset_size,
    }, out / RESUME_NAME)
    return path
