"""What the routes share with the app: the service's state per process, and the constants the
page and the answers use. Its own module so that ``routes`` and ``app`` do not import each other."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

from lift_serve.service.errors import ServiceError
from lift_serve.service.features import FeatureService
from lift_serve.service.metrics import ServiceMetrics
from lift_serve.service.settings import Settings

STATIC_DIR = Path(__file__).resolve().parent / "static"
DEMO_WARNING = ("DEMO BUNDLE: randomly initialised ViT and untrained LiFT — its features are MEANINGLESS. "
                "It exists to try the API; serve a real bundle (`lift export ...`, then `lift serve --bundle DIR`).")



def weights_warning(runtime) -> str | None:
    """What the log, ``/v1/models`` and the page say about a bundle whose features are meaningless:
    the demo warning, or which parts of it have random or untrained weights (the manifest's
    ``random_weights``); None for a bundle of trained weights."""
    if runtime.demo:
        return DEMO_WARNING
    manifest = getattr(runtime, "manifest", None)
    parts = list(getattr(manifest, "random_weights", None) or [])
    if not parts and getattr(getattr(manifest, "backbone", None), "weights", None) == "random":
        parts = ["backbone"]  # a manifest from before random_weights existed
    if not parts:
        return None
    names = {"backbone": "the backbone's weights are random", "upsampler": "the upsampler is untrained"}
    return (f"UNTRAINED WEIGHTS: {' and '.join(names.get(p, p) for p in parts)} in this bundle, so its features are "
            "MEANINGLESS. Export one with trained weights (see README, 'Real features in one command').")


class ServiceState:
    """Everything a request needs: settings, metrics and, once loaded, the runtime and its pipeline."""

    def __init__(self, settings: Settings, runtime=None, demo_exporter: Callable[[Path], Path] | None = None,
                 bundle_source: Callable[[], Path] | None = None):
        self.settings = settings
        self.metrics = ServiceMetrics()
        self.runtime = runtime
        self.demo_exporter = demo_exporter
        self.bundle_source = bundle_source  # makes the bundle at start-up (a named model's first export)
        self.features: FeatureService | None = None
        self.load_error: str | None = None
        self.on_load_failure = None  # called (no arguments) when loading fails: `lift serve` then exits
        self.started = time.time()

    @property
    def ready(self) -> bool:
        return self.features is not None

    def require_ready(self) -> FeatureService:
        if self.features is not None:
            return self.features
        if self.load_error:
            # The reason (paths, ONNX Runtime's text) is in the server log, not for clients.
            raise ServiceError(503, "model_load_failed", "the model failed to load; the server log says why and "
                               "what to do", {"Retry-After": "30"})
        raise ServiceError(503, "not_ready", "the model is still loading; retry shortly", {"Retry-After": "2"})
