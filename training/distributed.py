"""torchrun / DistributedDataParallel plumbing: which rank this is, its device, and global counts."""

from __future__ import annotations

import dataclasses
import os

import torch
from lift_serve.training.config import TrainError


@dataclasses.dataclass
class Dist:
    world_size: int = 1
    rank: int = 0
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def setup_distributed(device_arg: str) -> Dist:
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
    return Dist(world_size, rank, local_rank, device)


def global_count(count: int, dist: Dist) -> int:
    if dist.world_size == 1:
        return count
    value = torch.tensor([count], dtype=torch.long, device=dist.device)
    torch.distributed.all_reduce(value)
    return int(value.item())


