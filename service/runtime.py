"""Run a bundle with ONNX Runtime: numpy in, numpy out, no torch or timm.

:class:`BundleRuntime` loads every graph of a bundle (one per LiFT iteration count), checks the
manifest against each graph's declared inputs and outputs, picks execution providers in the order
asked (TensorRT only when asked for, then CUDA, then CPU, which is always the last resort), logs on
the ``lift.runtime`` logger which provider actually runs and why a preferred one was skipped, and
warms up every supported input size so that the first request does not pay for ORT's lazy setup.

Input and output conventions (the bundle's contract, see ``lift_serve.bundle``):

* ``images``: uint8 ``[B, H, W, 3]`` RGB pixels 0..255, ``(H, W)`` one of :attr:`BundleRuntime.sizes`
  (resizing to a supported size is the caller's job: the geometry object that maps clicks to cells
  must know the size used);
* result: float32 ``[B, C, h, w]`` features on the feature grid, cell ``(i, j)`` covering input
  pixels ``[i*stride, (i+1)*stride) x [j*stride, (j+1)*stride)``.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
from lift_serve.bundle import BundleError, graph_file_name, read_manifest, sha256_file

__all__ = ["BundleError", "BundleRuntime", "read_manifest", "PROVIDERS", "GRAPH_OPTIMIZATIONS"]

logger = logging.getLogger("lift.runtime")

PROVIDERS = {
    "tensorrt": "TensorrtExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "cpu": "CPUExecutionProvider",
}
GRAPH_OPTIMIZATIONS = ("disable", "basic", "extended", "all")
_ORT_TYPES = {"uint8": "tensor(uint8)", "float32": "tensor(float)", "float16": "tensor(float16)"}


def _import_onnxruntime():
    try:
        import onnxruntime
    except ImportError:
        raise BundleError(
            "onnxruntime is not installed; install the 'serve' extra (CPU) or the 'gpu' extra "
            "(onnxruntime-gpu), never both"
        ) from None
    return onnxruntime


def _session_options(ort, intra_op_threads: int, inter_op_threads: int, graph_optimization: str):
    if graph_optimization not in GRAPH_OPTIMIZATIONS:
        raise BundleError(f"graph_optimization must be one of {GRAPH_OPTIMIZATIONS}, got {graph_optimization!r}")
    for name, value in (("intra_op_threads", intra_op_threads), ("inter_op_threads", inter_op_threads)):
        if not isinstance(value, int) or value < 0:
            raise BundleError(f"{name} must be an integer >= 0 (0 = ONNX Runtime decides), got {value!r}")
    options = ort.SessionOptions()
    level = ort.GraphOptimizationLevel
    options.graph_optimization_level = {
        "disable": level.ORT_DISABLE_ALL,
        "basic": level.ORT_ENABLE_BASIC,
        "extended": level.ORT_ENABLE_EXTENDED,
        "all": level.ORT_ENABLE_ALL,
    }[graph_optimization]
    options.intra_op_num_threads = intra_op_threads
    options.inter_op_num_threads = inter_op_threads
    options.log_severity_level = 3  # ORT's own warnings (e.g. unused initialisers) are noise here
    return options


def resolve_providers(requested, available: list[str]) -> list[str]:
    """Map short names to ORT provider names, in order, dropping ones this ORT build lacks.

    Args:
        requested: short names from ``PROVIDERS`` (``"tensorrt"`` is used only when listed).
        available: ``onnxruntime.get_available_providers()``.

    Returns:
        ORT provider names to try, always ending with ``CPUExecutionProvider``.
    """
    if isinstance(requested, str):
        requested = [p.strip() for p in requested.split(",") if p.strip()]
    chosen = []
    for short in requested:
        if short not in PROVIDERS:
            raise BundleError(f"unknown execution provider {short!r}; choose from {list(PROVIDERS)}")
        name = PROVIDERS[short]
        if name not in available:
            logger.info("provider %s skipped: not available in this onnxruntime build (%s)",
                        short, ", ".join(available))
            continue
        if name not in chosen:
            chosen.append(name)
    if PROVIDERS["cpu"] not in chosen:
        chosen.append(PROVIDERS["cpu"])
    return chosen


class _Graph:
    """One ONNX Runtime session and what the manifest says about it."""

    def __init__(self, session, iterations: int, stride: float):
        self.session = session
        self.iterations = iterations
        self.stride = stride


class BundleRuntime:
    """A loaded, validated and warmed-up bundle.

    Args:
        bundle_dir: directory holding ``manifest.json`` and the graphs it lists.
        providers: preference order of execution providers, short names ``"tensorrt"``, ``"cuda"``,
            ``"cpu"`` (a list, or a comma-separated string). Providers missing from this ORT build
            are skipped with a log line; CPU is always the final fallback.
        intra_op_threads, inter_op_threads: ORT thread pools; 0 lets ORT decide (one per core).
        graph_optimization: ``"disable"``, ``"basic"``, ``"extended"`` or ``"all"``.
        warmup: run every graph once at every supported size (batch 1) before returning.

    Attributes:
        manifest: the validated manifest dict.
        sizes: supported input sizes as ``(height, width)``.
        iterations: LiFT iteration counts offered, one graph each (0 = backbone features only).
        default_iterations: what :meth:`run` uses when not told.
        channels: C of the features. patch_size: the ViT's patch size. demo: untrained demo bundle.
        active_providers: ORT provider names the sessions actually run with, in priority order.

    Raises:
        BundleError: missing directory/manifest/graph, a graph whose bytes differ from the manifest's
            sha256 (truncated or replaced), or a graph whose input/output names, dtypes or channel
            count disagree with the manifest.
    """

    def __init__(self, bundle_dir, providers=("cuda", "cpu"), intra_op_threads=0, inter_op_threads=0,
                 graph_optimization="all", warmup=True):
        ort = _import_onnxruntime()
        self.bundle_dir = Path(bundle_dir)
        self.manifest = read_manifest(self.bundle_dir)
        m = self.manifest
        self.sizes = [(int(h), int(w)) for h, w in m["input"]["sizes"]]
        self.iterations = sorted(int(k) for k in m["lift"]["iterations"])
        self.default_iterations = int(m["lift"]["default_iterations"])
        self.channels = int(m["output"]["channels"])
        self.patch_size = int(m["backbone"]["patch_size"])
        self.demo = bool(m["demo"])
        self.input_name = m["input"]["name"]
        self.output_name = m["output"]["name"]
        self.output_dtype = m["output"]["dtype"]
        options = _session_options(ort, intra_op_threads, inter_op_threads, graph_optimization)
        wanted = resolve_providers(providers, ort.get_available_providers())
        self._graphs: dict[int, _Graph] = {}
        for entry in m["graphs"]:
            session = self._open_session(ort, entry, options, wanted)
            self._graphs[entry["iterations"]] = _Graph(session, entry["iterations"], float(entry["stride"]))
        first = self._graphs[self.iterations[0]].session
        self.active_providers = list(first.get_providers())
        self._log_providers(wanted)
        if warmup:
            self.warmup()

    # -- loading ---------------------------------------------------------------------------
    def _open_session(self, ort, entry: dict, options, wanted: list[str]):
        path = self.bundle_dir / entry["file"]
        if not path.is_file():
            raise BundleError(
                f"graph file {path} listed in the manifest is missing (for {entry['iterations']} LiFT "
                "iterations); copy the whole bundle directory or re-export it with `lift export`"
            )
        if entry["file"] != graph_file_name(entry["iterations"]):
            logger.debug("graph %s does not follow the model_k<iterations>.onnx naming", entry["file"])
        digest = sha256_file(path)
        if digest != entry["sha256"]:
            raise BundleError(
                f"graph file {path} has sha256 {digest[:12]}… but the manifest records "
                f"{entry['sha256'][:12]}…: the file is truncated, corrupted or from another export; "
                "copy the bundle again or re-export it with `lift export`"
            )
        try:
            session = ort.InferenceSession(str(path), sess_options=options, providers=wanted)
        except Exception as exc:  # ORT raises several private exception types for unreadable graphs
            raise BundleError(f"ONNX Runtime cannot load {path}: {str(exc)[:300]}") from None
        self._check_signature(session, path)
        return session

    def _check_signature(self, session, path: Path) -> None:
        inputs, outputs = session.get_inputs(), session.get_outputs()
        if [i.name for i in inputs] != [self.input_name]:
            raise BundleError(
                f"{path} takes inputs {[i.name for i in inputs]}, but the manifest says one input "
                f"{self.input_name!r}; the manifest and graph do not belong together, re-export the bundle"
            )
        if self.output_name not in [o.name for o in outputs]:
            raise BundleError(
                f"{path} has outputs {[o.name for o in outputs]}, but the manifest names {self.output_name!r}; "
                "re-export the bundle"
            )
        inp = inputs[0]
        out = next(o for o in outputs if o.name == self.output_name)
        channels_in = inp.shape[3] if len(inp.shape) == 4 else None
        wrong_channels = isinstance(channels_in, int) and channels_in != 3
        if inp.type != _ORT_TYPES["uint8"] or len(inp.shape) != 4 or wrong_channels:
            raise BundleError(f"{path}: input {inp.name!r} is {inp.type} {inp.shape}, expected uint8 [B,H,W,3]")
        if out.type != _ORT_TYPES[self.output_dtype] or len(out.shape) != 4:
            raise BundleError(
                f"{path}: output {out.name!r} is {out.type} {out.shape}, manifest expects "
                f"{self.output_dtype} [B,C,h,w]"
            )
        if isinstance(out.shape[1], int) and out.shape[1] != self.channels:
            raise BundleError(
                f"{path}: output {out.name!r} has {out.shape[1]} channels, the manifest says {self.channels}; "
                "re-export the bundle"
            )

    def _log_providers(self, wanted: list[str]) -> None:
        for name in wanted:
            if name not in self.active_providers:
                logger.warning("provider %s failed to initialise (see ONNX Runtime's log); falling back", name)
        logger.info("bundle %s runs on %s (graphs for LiFT iterations %s, sizes %s)",
                    self.bundle_dir, self.active_providers[0], self.iterations, self.sizes)
        if self.active_providers[0] == PROVIDERS["cpu"] and len(wanted) > 1:
            logger.warning("running on CPU although %s was preferred", wanted[0])

    def warmup(self) -> None:
        """Run each graph at each supported size once (batch 1) and check the output shape."""
        for k in self.iterations:
            for height, width in self.sizes:
                try:
                    features = self.run(np.zeros((1, height, width, 3), np.uint8), k)
                except Exception as exc:  # ORT raises private types, e.g. a graph exported for one size
                    raise BundleError(
                        f"graph for {k} LiFT iterations cannot run at {height}x{width}, a size the manifest "
                        f"lists ({type(exc).__name__}: {str(exc)[:300]}); re-export the bundle with `lift export`"
                    ) from None
                expected = (1, self.channels, *self.feature_size(height, width, k))
                if features.shape != expected:
                    raise BundleError(
                        f"graph for {k} LiFT iterations returns {features.shape} at {height}x{width}, the "
                        f"manifest implies {expected}; re-export the bundle"
                    )

    # -- geometry ----------------------------------------------------------------------------
    def _resolve(self, iterations: int | None) -> int:
        k = self.default_iterations if iterations is None else iterations
        if k not in self._graphs:
            raise ValueError(f"LiFT iterations {k!r} not offered by this bundle; choose one of {self.iterations}")
        return k

    def stride(self, iterations: int | None = None) -> float:
        """Input pixels per feature cell (``patch_size / 2**iterations``)."""
        return self._graphs[self._resolve(iterations)].stride

    def feature_size(self, height: int, width: int, iterations: int | None = None) -> tuple[int, int]:
        """Feature grid ``(h, w)`` for a ``height x width`` input."""
        stride = self.stride(iterations)
        return int(round(height / stride)), int(round(width / stride))

    # -- inference ---------------------------------------------------------------------------
    def check_images(self, images) -> np.ndarray:
        """Validate a batch; returns it C-contiguous. Raises ValueError naming expected vs found."""
        if not isinstance(images, np.ndarray):
            raise ValueError(f"images must be a numpy array uint8 [B,H,W,3], found {type(images).__name__}")
        if images.dtype != np.uint8:
            raise ValueError(f"images must be uint8 pixels 0..255, found dtype {images.dtype}")
        if images.ndim != 4 or images.shape[3] != 3 or images.shape[0] < 1:
            raise ValueError(f"images must have shape [B,H,W,3] with B >= 1 (RGB), found {list(images.shape)}")
        size = (int(images.shape[1]), int(images.shape[2]))
        if size not in self.sizes:
            raise ValueError(
                f"input size {size[0]}x{size[1]} (height x width) is not supported by this bundle; "
                f"supported: {', '.join(f'{h}x{w}' for h, w in self.sizes)}; resize first"
            )
        return np.ascontiguousarray(images)

    def run(self, images: np.ndarray, iterations: int | None = None) -> np.ndarray:
        """Dense features of a batch.

        Args:
            images: uint8 ``[B, H, W, 3]`` RGB, ``(H, W)`` in :attr:`sizes`.
            iterations: LiFT rounds (one of :attr:`iterations`); None = :attr:`default_iterations`.

        Returns:
            float32 ``[B, C, H/stride, W/stride]`` (fp16 bundles are cast to float32).
        """
        k = self._resolve(iterations)
        images = self.check_images(images)
        (features,) = self._graphs[k].session.run([self.output_name], {self.input_name: images})
        return features.astype(np.float32, copy=False)

    def describe(self) -> dict:
        """A JSON-ready summary for ``/v1/models``."""
        m = self.manifest
        return {
            "backbone": m["backbone"]["timm_name"],
            "demo": self.demo,
            "sizes": [list(s) for s in self.sizes],
            "iterations": self.iterations,
            "default_iterations": self.default_iterations,
            "strides": {str(k): self.stride(k) for k in self.iterations},
            "channels": self.channels,
            "precision": m["onnx"]["precision"],
            "providers": self.active_providers,
            "parity": {"max_abs_err": m["parity"].get("max_abs_err"), "min_cosine": m["parity"].get("min_cosine")},
        }
