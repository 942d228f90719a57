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
from lift_serve.service.ort_options import CUDA, TENSORRT, GpuOptions, session_providers, warmup_batch_sizes
from lift_serve.service.runtime_base import ManifestRuntime

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


def _session_options(ort, intra_op_threads: int, inter_op_threads: int, graph_optimization: str,
                     spinning: bool = False):
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
    # ORT's pool threads spin between parallel sections by default. In a server they spin against
    # the event loop, the decoders and anything else on the host: measured on a 2-core VM, the same
    # graphs ran 1.56x faster at batch 1 and 1.1-1.25x at batch 8 with spinning off.
    value = "1" if spinning else "0"
    options.add_session_config_entry("session.intra_op.allow_spinning", value)
    options.add_session_config_entry("session.inter_op.allow_spinning", value)
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


class BundleRuntime(ManifestRuntime):
    """A loaded, validated and warmed-up format-2 bundle on ONNX Runtime.

    Args:
        bundle_dir: directory holding ``manifest.json`` and the graphs it lists.
        providers: preference order of execution providers, short names ``"tensorrt"``, ``"cuda"``,
            ``"cpu"`` (a list, or a comma-separated string). Providers missing from this ORT build
            are skipped with a log line; CPU is always the final fallback.
        intra_op_threads, inter_op_threads: ORT thread pools; 0 lets ORT decide (one per core).
        graph_optimization: ``"disable"``, ``"basic"``, ``"extended"`` or ``"all"``.
        warmup: run every graph at every supported size before returning (a GPU also pays per batch
            size: see ``warmup_mode``).
        gpu_options: :class:`~lift_serve.service.ort_options.GpuOptions`, the TensorRT and CUDA
            providers' options (fp16, engine cache, shape profiles, cuDNN search); None = defaults.
        warmup_mode: batch sizes the warm-up runs: ``auto`` (every batch the batcher can form,
            1 .. ``gpu_options.max_batch_size``, on a GPU provider; batch 1 on the CPU), ``all``, ``one``.
        spinning: let ONNX Runtime's pool threads spin while they wait for work (its own default;
            off here, see ``_session_options``).
        io_binding: run backbone + upsampler as one chain whose intermediates stay on the device
            (ONNX Runtime I/O binding), copied to the host once; None = on a GPU provider only.

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
                 graph_optimization="all", warmup=True, gpu_options: GpuOptions | None = None,
                 warmup_mode: str = "auto", io_binding: bool | None = None, spinning: bool = False):
        ort = self._ort = _import_onnxruntime()
        self.bundle_dir = Path(bundle_dir)
        self._adopt(read_manifest(self.bundle_dir))
        m: Manifest = self.manifest
        self.gpu_options = gpu_options or GpuOptions()
        options = _session_options(ort, intra_op_threads, inter_op_threads, graph_optimization, spinning)
        wanted = resolve_providers(providers, ort.get_available_providers())
        self._sessions = {role: self._open_session(ort, role, graph, options,
                                                   session_providers(wanted, role, m, self.gpu_options))
                          for role, graph in m.graph_files().items()}
        self.active_providers = list(self._sessions["backbone"].get_providers())
        self._log_providers(wanted)
        on_gpu = self.active_providers[0] in (TENSORRT, CUDA)
        self.io_device = ("cuda" if on_gpu else "cpu") if (on_gpu if io_binding is None else io_binding) else None
        self.warmup_batch_sizes = warmup_batch_sizes(self.active_providers[0], self.gpu_options, warmup_mode)
        if warmup:
            self.warmup(self.warmup_batch_sizes)

    # -- loading ---------------------------------------------------------------------------
    def _open_session(self, ort, role: str, graph: GraphFile, options, wanted: list):
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
        in_types, out_types = self.expected_types(role)
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

    # -- inference ---------------------------------------------------------------------------
    def embed(self, images: np.ndarray) -> np.ndarray:
        """Backbone features ``[B, C, H/P, W/P]`` of a batch, in the bundle's precision
        (:attr:`feature_dtype`): the part worth caching."""
        images = self.check_images(images)
        (features,) = self._sessions["backbone"].run(None, {self.manifest.backbone.graph.inputs[0]: images})
        return features

    def _steps(self, images: np.ndarray, features: np.ndarray, k: int) -> np.ndarray:
        graphs = self.manifest.upsampler.graphs
        (state,) = self._sessions["upsampler_prepare"].run(None, {graphs.prepare.inputs[0]: images})
        state_name, features_name = graphs.step.inputs
        for _ in range(k):
            state, features = self._sessions["upsampler_step"].run(None, {state_name: state, features_name: features})
        return features

    def embed_and_upsample(self, images: np.ndarray, iterations: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """``(backbone features, features at density iterations)`` of one batch, both in the bundle's
        precision. With :attr:`io_device` set (a GPU provider), the chain runs with ONNX Runtime's I/O
        binding: the backbone's output, the upsampler's state and every step's features stay on the
        device, and only the two answers are copied to the host, once each."""
        k = self._resolve(iterations)
        if self.io_device is None or k == 0:
            coarse = self.embed(images)
            return coarse, self.upsample(images, coarse, k)
        graphs, device = self.manifest.upsampler.graphs, self.io_device
        # The batch goes to the device once, for both graphs that read it.
        device_id = self.gpu_options.cuda_device_id if device == "cuda" else 0
        images = self._ort.OrtValue.ortvalue_from_numpy(self.check_images(images), device, device_id)
        backbone = self._bound(self._sessions["backbone"], {self.manifest.backbone.graph.inputs[0]: images}, device)
        (coarse,) = backbone.get_outputs()
        prepare = self._bound(self._sessions["upsampler_prepare"], {graphs.prepare.inputs[0]: images}, device)
        (state,) = prepare.get_outputs()
        features = coarse
        state_name, features_name = graphs.step.inputs
        for _ in range(k):
            step = self._bound(self._sessions["upsampler_step"], {state_name: state, features_name: features}, device)
            state, features = step.get_outputs()
        return coarse.numpy(), features.numpy()

    @staticmethod
    def _bound(session, inputs: dict, device: str):
        """Run ``session`` with its inputs (host arrays or device OrtValues) bound and its outputs left
        on ``device``; returns the binding, whose ``get_outputs()`` are the OrtValues."""
        binding = session.io_binding()
        for name, value in inputs.items():
            if isinstance(value, np.ndarray):
                binding.bind_cpu_input(name, value)
            else:
                binding.bind_ortvalue_input(name, value)
        for output in session.get_outputs():
            binding.bind_output(output.name, device)
        session.run_with_iobinding(binding)
        return binding
