"""The ONNX Runtime implementation of the service's :class:`~lift_serve.service.runtime.Runtime`:
a format-2 bundle run with numpy in, numpy out, no torch or timm.

It opens the backbone graph and, if the bundle has an upsampler, its ``prepare`` and ``step``
graphs; checks each graph's declared inputs and outputs against the manifest; picks execution
providers in the order asked (TensorRT only when asked for, then CUDA, then CPU, the last resort),
logging on ``lift.runtime`` which provider actually runs and why a preferred one was skipped; and
warms every graph at every listed size, so the first request does not pay for ORT's lazy setup.

Conventions (the bundle contract, ``lift_serve.bundle``):

* ``images``: uint8 ``[B, H, W, 3]`` RGB pixels 0..255, ``(H, W)`` one of :attr:`BundleRuntime.sizes`
  (resizing is the caller's job: the geometry that maps clicks to cells must know the size used);
* features: ``[B, C, h, w]``, cell ``(i, j)`` covering input pixels
  ``[i*stride, (i+1)*stride) x [j*stride, (j+1)*stride)``, ``stride = patch / 2**k``; in the bundle's
  own precision from :meth:`BundleRuntime.embed` and :meth:`BundleRuntime.upsample` (a float16
  bundle gives float16, which the service caches at half the bytes), float32 from
  :meth:`BundleRuntime.run`.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

import numpy as np
from lift_serve.bundle import BundleError, GraphFile, Manifest, read_manifest

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
            # A WARNING: a GPU host that silently runs on the CPU is slower by orders of magnitude.
            logger.warning("provider %s skipped: not available in this onnxruntime build (%s); set "
                           "LIFT_PROVIDERS to what this host has, or LIFT_REQUIRE_PROVIDER to refuse to start",
                           short, ", ".join(available))
            continue
        if name not in chosen:
            chosen.append(name)
    if PROVIDERS["cpu"] not in chosen:
        chosen.append(PROVIDERS["cpu"])
    return chosen


class BundleRuntime:
    """A loaded, validated and warmed-up format-2 bundle on ONNX Runtime.

    Args:
        bundle_dir: directory holding ``manifest.json`` and the graphs it lists.
        providers: preference order of execution providers, short names ``"tensorrt"``, ``"cuda"``,
            ``"cpu"`` (a list, or a comma-separated string). Providers missing from this ORT build
            are skipped with a log line; CPU is always the final fallback.
        intra_op_threads, inter_op_threads: ORT thread pools; 0 lets ORT decide (one per core).
        graph_optimization: ``"disable"``, ``"basic"``, ``"extended"`` or ``"all"``.
        warmup: run every graph once at every supported size (batch 1) before returning.

    Attributes:
        manifest: the validated :class:`~lift_serve.bundle.Manifest`.
        sizes: supported input sizes as ``(height, width)``.
        iterations: upsampler steps offered (0 = backbone features only); each costs that many steps.
        default_iterations: what :meth:`run` uses when not told.
        channels: C of the features. patch_size: the backbone's patch size. demo: untrained demo bundle.
        active_providers: ORT provider names the sessions actually run with, in priority order.

    Raises:
        BundleError: missing directory/manifest/graph, a graph whose bytes differ from the manifest's
            sha256 (truncated or replaced), or a graph whose tensor names, dtypes or channel count
            disagree with the manifest.
    """

    def __init__(self, bundle_dir, providers=("cuda", "cpu"), intra_op_threads=0, inter_op_threads=0,
                 graph_optimization="all", warmup=True):
        ort = _import_onnxruntime()
        self.bundle_dir = Path(bundle_dir)
        self.manifest: Manifest = read_manifest(self.bundle_dir)
        m = self.manifest
        self.sizes = [(int(h), int(w)) for h, w in m.input.sizes]
        self.iterations = sorted(m.iterations)
        self.default_iterations = m.default_iterations
        self.channels = m.output.channels
        self.patch_size = m.backbone.patch_size
        self.demo = m.demo
        self.output_dtype = m.output.dtype
        self.feature_dtype = np.dtype(np.float16 if self.output_dtype == "float16" else np.float32)
        options = _session_options(ort, intra_op_threads, inter_op_threads, graph_optimization)
        wanted = resolve_providers(providers, ort.get_available_providers())
        self._sessions = {role: self._open_session(ort, role, graph, options, wanted)
                          for role, graph in m.graph_files().items()}
        self.active_providers = list(self._sessions["backbone"].get_providers())
        self._log_providers(wanted)
        if warmup:
            self.warmup()

    # -- loading ---------------------------------------------------------------------------
    def _open_session(self, ort, role: str, graph: GraphFile, options, wanted: list[str]):
        path = self.bundle_dir / graph.file
        if path.is_symlink() or (path.exists() and path.resolve().parent != self.bundle_dir.resolve()):
            raise BundleError(
                f"graph file {path} is a link; a bundle's graphs must be plain files inside its directory (their "
                "sha256 covers what is loaded); copy the files themselves"
            )
        if not path.is_file():
            raise BundleError(
                f"graph file {path} listed in the manifest is missing (the {role} graph); copy the whole "
                "bundle directory or re-export it with `lift export`"
            )
        # The bytes that are hashed are the bytes that are loaded: ORT gets them, not the path, so it
        # cannot also read external-data files beside the graph, which no sha256 covers (a graph
        # that needs them is refused; `lift export` writes self-contained graphs).
        data = path.read_bytes()
        digest = hashlib.sha256(data).hexdigest()
        if digest != graph.sha256:
            raise BundleError(
                f"graph file {path} has sha256 {digest[:12]}… but the manifest records "
                f"{graph.sha256[:12]}…: the file is truncated, corrupted or from another export; "
                "copy the bundle again or re-export it with `lift export`"
            )
        try:
            session = ort.InferenceSession(data, sess_options=options, providers=wanted)
        except Exception as exc:  # ORT raises several private exception types for unreadable graphs
            raise BundleError(f"ONNX Runtime cannot load {path} ({str(exc)[:300]}); a graph must be one "
                              "self-contained file (external-data files are not covered by the manifest's "
                              "sha256): re-export the bundle with `lift export`") from None
        del data
        self._check_signature(session, role, graph, path)
        return session

    def _expected_types(self, role: str) -> tuple[list[str], list[str]]:
        model = self.output_dtype
        return {
            "backbone": (["uint8"], [model]),
            "upsampler_prepare": (["uint8"], [model]),
            "upsampler_step": ([model, model], [model, model]),
        }[role]

    def _check_signature(self, session, role: str, graph: GraphFile, path: Path) -> None:
        inputs, outputs = session.get_inputs(), session.get_outputs()
        if [i.name for i in inputs] != graph.inputs:
            raise BundleError(
                f"{path} takes inputs {[i.name for i in inputs]}, but the manifest says {graph.inputs}; the "
                "manifest and graph do not belong together, re-export the bundle"
            )
        if [o.name for o in outputs] != graph.outputs:
            raise BundleError(
                f"{path} has outputs {[o.name for o in outputs]}, but the manifest names {graph.outputs}; "
                "re-export the bundle"
            )
        in_types, out_types = self._expected_types(role)
        for tensor, wanted in [*zip(inputs, in_types, strict=True), *zip(outputs, out_types, strict=True)]:
            if tensor.type != _ORT_TYPES[wanted] or len(tensor.shape) != 4:
                raise BundleError(f"{path}: {tensor.name!r} is {tensor.type} {tensor.shape}, the manifest expects "
                                  f"{wanted} with 4 axes; re-export the bundle")
        image = inputs[0] if role != "upsampler_step" else None
        if image is not None and isinstance(image.shape[3], int) and image.shape[3] != 3:
            raise BundleError(f"{path}: input {image.name!r} is {image.shape}, expected uint8 [B,H,W,3]")
        features = outputs[0] if role == "backbone" else (outputs[1] if role == "upsampler_step" else None)
        if features is not None and isinstance(features.shape[1], int) and features.shape[1] != self.channels:
            raise BundleError(
                f"{path}: output {features.name!r} has {features.shape[1]} channels, the manifest says "
                f"{self.channels}; re-export the bundle"
            )

    def _log_providers(self, wanted: list[str]) -> None:
        for name in wanted:
            if name not in self.active_providers:
                logger.warning("provider %s failed to initialise (see ONNX Runtime's log); falling back", name)
        logger.info("bundle %s runs on %s (densities %s, sizes %s)",
                    self.bundle_dir, self.active_providers[0], self.iterations, self.sizes)
        if self.active_providers[0] == PROVIDERS["cpu"] and len(wanted) > 1:
            logger.warning("running on CPU although %s was preferred", wanted[0])

    def warmup(self) -> None:
        """Run the backbone and every offered density once at each supported size (batch 1)."""
        for height, width in self.sizes:
            images = np.zeros((1, height, width, 3), np.uint8)
            try:
                coarse = self.embed(images)
            except Exception as exc:  # ORT raises private types, e.g. a graph exported for one size
                raise BundleError(
                    f"the backbone graph cannot run at {height}x{width}, a size the manifest lists "
                    f"({type(exc).__name__}: {str(exc)[:300]}); re-export the bundle with `lift export`"
                ) from None
            for k in self.iterations:
                try:
                    features = self.upsample(images, coarse, k)
                except Exception as exc:
                    raise BundleError(
                        f"the upsampler graphs cannot reach density {k} at {height}x{width}, which the manifest "
                        f"lists ({type(exc).__name__}: {str(exc)[:300]}); re-export the bundle"
                    ) from None
                expected = (1, self.channels, *self.feature_size(height, width, k))
                if features.shape != expected:
                    raise BundleError(
                        f"density {k} gives {features.shape} at {height}x{width}, the manifest implies "
                        f"{expected}; re-export the bundle"
                    )

    # -- geometry ----------------------------------------------------------------------------
    def _resolve(self, iterations: int | None) -> int:
        k = self.default_iterations if iterations is None else iterations
        if k not in self.iterations:
            raise ValueError(f"LiFT iterations {k!r} not offered by this bundle; choose one of {self.iterations}")
        return k

    def stride(self, iterations: int | None = None) -> float:
        """Input pixels per feature cell (``patch_size / 2**iterations``)."""
        return self.manifest.stride(self._resolve(iterations))

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

    def embed(self, images: np.ndarray) -> np.ndarray:
        """Backbone features ``[B, C, H/P, W/P]`` of a batch, in the bundle's precision
        (:attr:`feature_dtype`): the part worth caching."""
        images = self.check_images(images)
        (features,) = self._sessions["backbone"].run(None, {self.manifest.backbone.graph.inputs[0]: images})
        return features

    def upsample(self, images: np.ndarray, coarse: np.ndarray, iterations: int | None = None) -> np.ndarray:
        """Features at density ``iterations`` from backbone features ``coarse`` of ``images``:
        ``prepare`` once, then ``step`` k times (no backbone pass). ``[B, C, h, w]`` in the bundle's
        precision (:attr:`feature_dtype`)."""
        k = self._resolve(iterations)
        features = np.ascontiguousarray(coarse, dtype=self.feature_dtype)
        if k == 0:
            return features
        images = self.check_images(images)
        graphs = self.manifest.upsampler.graphs
        (state,) = self._sessions["upsampler_prepare"].run(None, {graphs.prepare.inputs[0]: images})
        state_name, features_name = graphs.step.inputs
        for _ in range(k):
            state, features = self._sessions["upsampler_step"].run(None, {state_name: state, features_name: features})
        return features

    def run(self, images: np.ndarray, iterations: int | None = None) -> np.ndarray:
        """Dense features of a batch at density ``iterations`` (None = :attr:`default_iterations`):
        backbone, then the upsampler. float32 ``[B, C, H/stride, W/stride]``."""
        k = self._resolve(iterations)
        return self.upsample(images, self.embed(images), k).astype(np.float32, copy=False)

    def describe(self) -> dict:
        """A JSON-ready summary for ``/v1/models`` and logs."""
        m = self.manifest
        return {
            "backbone": m.backbone.timm_name,
            "upsampler": m.upsampler.kind if m.upsampler else None,
            "demo": self.demo,
            "sizes": [list(s) for s in self.sizes],
            "iterations": self.iterations,
            "default_iterations": self.default_iterations,
            "strides": {str(k): self.stride(k) for k in self.iterations},
            "channels": self.channels,
            "precision": m.onnx.precision,
            "providers": self.active_providers,
            "parity": {"max_abs_err": m.parity.max_abs_err, "min_cosine": m.parity.min_cosine},
        }
