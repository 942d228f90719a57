"""The LiFT training loop: Eq. 1 (``training.objective``), Adam, optional AMP, resumable, DDP-ready.

The loop lives here; its parts have their own modules: settings (``training.config``), the run's
resumable state (``training.state``), torchrun plumbing (``training.distributed``) and the log and
loss curve (``training.run_log``).

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

import functools
import math
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from lift_serve.model.backbone import BackboneSpec, ViTBackbone, build_backbone
from lift_serve.model.extractor import Preprocessing
from lift_serve.model.lift import LiFT
from lift_serve.model.upsampler import build_upsampler
from lift_serve.training.config import (
    CHECKPOINT_NAME,
    CURVE_NAME,
    LOG_NAME,
    RESUME_NAME,
    TrainConfig,
    TrainError,
    TrainResult,
    check_config,
    check_imsize_for_patch,
    levels_of,
    resolved_loss,
)
from lift_serve.training.data import ImageFolderDataset, ShardSampler, collate_images, scan_image_folder
from lift_serve.training.distributed import Dist, global_count, setup_distributed
from lift_serve.training.objective import MultiStepUpsampler, TwoOctaveLiFT, reconstruction_loss, uplift_loss
from lift_serve.training.run_log import RunLogger, plot_loss_curve
from lift_serve.training.state import load_resume_state, save_checkpoint_and_state, set_rng_state, trajectory_of


def _autocast(precision: str, device: torch.device):
    if precision == "fp32":
        return torch.autocast(device.type, enabled=False)
    if precision == "fp16" and device.type != "cuda":
        raise TrainError("--precision fp16 needs a CUDA device (fp16 autocast with loss scaling); "
                         "on the CPU use --precision bf16 or fp32")
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device.type, dtype=dtype)


def build_models(spec_dict: dict[str, Any], imsize: int | None, seed: int, upsampler: str = "lift",
                 levels: int = 2) -> tuple[ViTBackbone, LiFT]:
    """Frozen backbone and a freshly initialised upsampler (init seeded by ``seed``); ``imsize`` is
    checked against the backbone's patch size (None: the caller checks it)."""
    spec = BackboneSpec.from_dict(spec_dict)
    backbone = build_backbone(spec)
    if imsize is not None:
        check_imsize_for_patch(imsize, backbone.patch_size, levels)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        lift = build_upsampler(upsampler, {"in_channels": backbone.embed_dim, "patch_size": backbone.patch_size})
    return backbone, lift


class TrainStep:
    """One optimisation step of Eq. 1; shared by the trainer and ``lift bench train``.

    Args:
        backbone: the frozen ViT (on ``device``).
        lift_pair: :class:`TwoOctaveLiFT` (or its DDP wrapper) in train mode.
        preprocessing: the backbone's normalisation.
    """

    def __init__(self, backbone, lift_pair, preprocessing: Preprocessing, lr: float, precision: str,
                 loss: str, downsample: str, device: torch.device, objective=None):
        self.backbone, self.lift_pair, self.preprocessing = backbone, lift_pair, preprocessing
        # (backbone, module, images) -> (loss, (term, term)); default: Eq. 1 with ``loss`` and ``downsample``
        self.objective = objective or functools.partial(reconstruction_loss, loss=loss, mode=downsample)
        self.loss, self.downsample, self.device, self.precision = loss, downsample, device, precision
        _autocast(precision, device)  # validates precision for the device before any work
        self.optimizer = torch.optim.Adam(lift_pair.parameters(), lr=lr)
        self.scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")

    def __call__(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """images: [B,3,S,S] RGB, uint8 0..255 or float 0..1, any device.

        Returns detached (loss, term x/2->x, term x/4->x/2)."""
        images = self.preprocessing.normalize(images.to(self.device, non_blocking=True))
        with _autocast(self.precision, self.device):
            loss, (term_full, term_half) = self.objective(self.backbone, self.lift_pair, images)
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
    dist = setup_distributed(config.device)
    try:
        return _train(config, out, scan, dist)
    finally:
        if dist.world_size > 1 and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def _train(config: TrainConfig, out: Path, scan, dist: Dist) -> TrainResult:
    if dist.is_main:
        out.mkdir(parents=True, exist_ok=True)
    _autocast(config.precision, dist.device)
    trajectory = trajectory_of(config, dist.world_size)
    state = load_resume_state(out, trajectory) if config.resume else None
    logger = RunLogger(out, dist.is_main, state["step"] if state else None)
    if scan.unreadable or scan.ignored:
        logger.say(f"data: skipped {len(scan.unreadable)} files that are not readable images"
                   + (f" (e.g. {scan.unreadable[0]})" if scan.unreadable else "")
                   + f"; ignored {scan.ignored} files without an image extension")

    backbone, lift = build_models(config.backbone, config.imsize, config.seed, config.upsampler, levels_of(config))
    if state is not None:
        lift.load_state_dict(state["lift"])  # before DDP wraps it; every rank reads the same file
    backbone.to(dist.device)
    lift.to(dist.device).train()
    loss = resolved_loss(config)
    if config.upsampler == "uplift":
        lift_pair = MultiStepUpsampler(lift)
        objective = functools.partial(uplift_loss, levels=config.uplift_levels, loss=loss)
    else:
        lift_pair, objective = TwoOctaveLiFT(lift), None
    if dist.world_size > 1:
        from torch.nn.parallel import DistributedDataParallel

        ids = [dist.device.index] if dist.device.type == "cuda" else None
        lift_pair = DistributedDataParallel(lift_pair, device_ids=ids)
    preprocessing = Preprocessing(backbone.mean, backbone.std, backbone.patch_size)
    step_fn = TrainStep(backbone, lift_pair, preprocessing, config.lr, config.precision, loss,
                        config.downsample, dist.device, objective)

    dataset = ImageFolderDataset(scan.paths, config.imsize, config.augment, config.seed, config.resize)
    per_rank = math.ceil(len(dataset) / dist.world_size)
    steps_per_epoch = math.ceil(per_rank / config.batch_size)
    step, epoch, batch_in_epoch = 0, 0, 0
    skipped_paths: set[str] = set(map(str, scan.unreadable))
    if state is not None:
        step_fn.optimizer.load_state_dict(state["optimizer"])
        if state.get("scaler"):
            step_fn.scaler.load_state_dict(state["scaler"])
        set_rng_state(state["rng"])
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
    logger.say(f"training {type(lift).__name__}({lift.in_channels}, {lift.patch_size}) on {len(dataset)} images, "
               f"{steps_per_epoch} steps/epoch x {config.epochs} epochs, {dist.world_size} process(es) "
               f"on {dist.device}, precision {config.precision}")

    def save(completed_epochs: int) -> Path:
        return save_checkpoint_and_state(config, out, lift, step_fn, dist, trajectory, step, epoch_pos, batch_pos,
                                         completed_epochs, losses[-1] if losses else None, sorted(skipped_paths),
                                         len(dataset), backbone)

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
            skipped_total = global_count(len(skipped_paths), dist)
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


