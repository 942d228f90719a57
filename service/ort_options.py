"""GPU settings for ONNX Runtime that hold in production: the TensorRT and CUDA providers' options.

Without them, ONNX Runtime's TensorRT provider builds every engine at each start (minutes for a
ViT), builds a new one mid-request when a batch size falls outside the shapes it has seen, and runs
in fp32; the CUDA provider's cuDNN picks convolution algorithms per new shape on the first request
of that shape. :class:`GpuOptions` (``LIFT_TRT_*``, ``LIFT_CUDNN_CONV_ALGO_SEARCH``) says instead:

* **TensorRT**: fp16 kernels (``LIFT_TRT_FP16``), an engine cache and a timing cache in
  ``LIFT_TRT_ENGINE_CACHE_DIR`` (a volume: the second start loads the engines instead of building
  them), a workspace limit, and **explicit optimisation profiles** for the graphs whose only input
  is the image (backbone, upsampler ``prepare``): ``min`` = batch 1 at the smallest listed size,
  ``opt`` = the largest batch at the first listed size, ``max`` = the largest batch at the largest
  size, so one engine covers every batch the batcher can form. The ``step`` graph's inputs (the
  upsampler's state and features) have shapes only the upsampler knows; its engines are built by
  the start-up warm-up, which runs every shape the service will ask for, and cached.
* **CUDA**: ``cudnn_conv_algo_search`` chosen explicitly (``EXHAUSTIVE`` by default: the best
  algorithm per shape, searched once per shape during the warm-up, which covers every shape), with
  the maximum cuDNN workspace allowed, on ``LIFT_CUDA_DEVICE_ID``.

Options are plain strings, as ONNX Runtime's C API takes them; the runtime passes them per session
(``InferenceSession(providers=[(name, options), ...])``) and ``session.get_provider_options()``
shows what each session really got.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from lift_serve.bundle import Manifest

TENSORRT = "TensorrtExecutionProvider"
CUDA = "CUDAExecutionProvider"
CUDNN_SEARCH = ("EXHAUSTIVE", "HEURISTIC", "DEFAULT")
IMAGE_ROLES = ("backbone", "upsampler_prepare")  # graphs whose one input is the uint8 image batch


@dataclasses.dataclass(frozen=True)
class GpuOptions:
    """What the TensorRT and CUDA providers are told (see the module docstring)."""

    max_batch_size: int = 8
    trt_fp16: bool = True
    trt_engine_cache_dir: Path | None = None
    trt_max_workspace_bytes: int = 2 << 30
    trt_profiles: bool = True
    cudnn_conv_algo_search: str = "EXHAUSTIVE"
    cuda_device_id: int = 0

    def __post_init__(self):
        if self.cudnn_conv_algo_search not in CUDNN_SEARCH:
            raise ValueError(f"cudnn_conv_algo_search must be one of {CUDNN_SEARCH}, "
                             f"got {self.cudnn_conv_algo_search!r}")
        if self.max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {self.max_batch_size}")


def image_profiles(manifest: Manifest, input_name: str, max_batch: int) -> dict[str, str]:
    """``trt_profile_{min,opt,max}_shapes`` for a graph taking uint8 ``[B, H, W, 3]`` images."""
    sizes = [(int(h), int(w)) for h, w in manifest.input.sizes]
    smallest = min(sizes, key=lambda s: s[0] * s[1])
    largest = (max(h for h, _ in sizes), max(w for _, w in sizes))

    def shape(batch: int, size: tuple[int, int]) -> str:
        return f"{input_name}:{batch}x{size[0]}x{size[1]}x3"

    return {"trt_profile_min_shapes": shape(1, smallest), "trt_profile_opt_shapes": shape(max_batch, sizes[0]),
            "trt_profile_max_shapes": shape(max_batch, largest)}


def provider_options(provider: str, role: str, manifest: Manifest, options: GpuOptions) -> dict[str, str]:
    """The options of ``provider`` (an ORT provider name) for the session of graph ``role``."""
    if provider == TENSORRT:
        out = {"device_id": str(options.cuda_device_id), "trt_fp16_enable": _flag(options.trt_fp16),
               "trt_max_workspace_size": str(options.trt_max_workspace_bytes)}
        if options.trt_engine_cache_dir is not None:
            cache = str(Path(options.trt_engine_cache_dir).expanduser())
            out |= {"trt_engine_cache_enable": "1", "trt_engine_cache_path": cache,
                    "trt_timing_cache_enable": "1", "trt_timing_cache_path": cache}
        if options.trt_profiles and role in IMAGE_ROLES:
            graph = manifest.graph_files()[role]
            out |= image_profiles(manifest, graph.inputs[0], options.max_batch_size)
        return out
    if provider == CUDA:
        return {"device_id": str(options.cuda_device_id), "cudnn_conv_algo_search": options.cudnn_conv_algo_search,
                "cudnn_conv_use_max_workspace": "1"}
    return {}


def session_providers(wanted: list[str], role: str, manifest: Manifest,
                      options: GpuOptions) -> list[tuple[str, dict[str, str]]]:
    """``InferenceSession``'s ``providers`` argument: each wanted provider with its options."""
    return [(name, provider_options(name, role, manifest, options)) for name in wanted]


def warmup_batch_sizes(active_provider: str, options: GpuOptions, mode: str = "auto") -> list[int]:
    """Batch sizes the start-up warm-up runs at every size and density.

    ``auto``: every size the batcher can form (1 .. ``max_batch_size``) on a GPU provider, where a
    new shape costs a cuDNN search or a TensorRT engine; batch 1 on the CPU, where it costs
    nothing worth a longer start. ``all``: every size whatever the provider. ``one``: batch 1.
    """
    if mode not in ("auto", "all", "one"):
        raise ValueError(f"warm-up mode must be auto, all or one, got {mode!r}")
    every = list(range(1, options.max_batch_size + 1))
    if mode == "all" or (mode == "auto" and active_provider in (TENSORRT, CUDA)):
        return every
    return [1]


def _flag(value: bool) -> str:
    return "1" if value else "0"
