"""The FastAPI application: :func:`create_app` builds it, its ``lifespan`` loads the model.

Startup: the settings are checked at once (no bundle and no demo -> startup fails with a message
saying how to make one; a bundle whose manifest is missing or malformed fails the same way). The
ONNX sessions are then created and warmed in a background thread, so ``/healthz`` answers at once
and ``/readyz`` says 503 until the model is ready; model endpoints answer 503 ``not_ready`` with
``Retry-After`` meanwhile. If loading fails, the error is logged and reported by ``/readyz``.

Run it with ``lift serve`` or ``uvicorn --factory service.app:create_app`` (settings from ``LIFT_*``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from pathlib import Path

from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware
from fastapi.staticfiles import StaticFiles

from service.errors import ServiceError, error_body, install_error_handlers
from service.features import FeatureService
from service.metrics import ServiceMetrics
from service.settings import Settings, get_settings

logger = logging.getLogger("lift.service")

STATIC_DIR = Path(__file__).resolve().parent / "static"
DEMO_WARNING = ("DEMO BUNDLE: randomly initialised ViT and untrained LiFT — its features are MEANINGLESS. "
                "It exists to try the API; serve a real bundle (`lift export ...`, then `lift serve --bundle DIR`).")
# Headers a browser page may read from a cross-origin response.
EXPOSED_HEADERS = ["X-Feature-Id", "X-Target-Feature-Id", "X-Feature-Id-A", "X-Feature-Id-B", "X-Feature-Shape",
                   "X-Feature-Stride", "X-Input-Size", "X-Image-Size", "X-Query-Cell", "Retry-After"]


class ConfigError(ValueError):
    """The settings cannot work (e.g. neither a bundle nor demo mode); the message says what to do."""

    user_facing = True


NO_BUNDLE_MESSAGE = (
    "no bundle to serve: pass --bundle DIR (or set LIFT_BUNDLE) to a bundle made with "
    "`lift export --checkpoint LIFT.safetensors --out DIR`, or try the API with an untrained demo model: "
    "`lift serve --demo` (LIFT_DEMO=true)"
)


class ServiceState:
    """Everything a request needs: settings, metrics and, once loaded, the runtime and its pipeline."""

    def __init__(self, settings: Settings, runtime=None):
        self.settings = settings
        self.metrics = ServiceMetrics()
        self.runtime = runtime
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
            raise ServiceError(503, "model_load_failed", f"the model failed to load: {self.load_error}")
        raise ServiceError(503, "not_ready", "the model is still loading; retry shortly", {"Retry-After": "2"})


def check_settings(settings: Settings) -> None:
    """Fail fast on settings that cannot work (raises ConfigError or the bundle's BundleError)."""
    if settings.bundle is None and not settings.demo:
        raise ConfigError(NO_BUNDLE_MESSAGE)
    if settings.bundle is not None:
        from service.runtime import read_manifest

        read_manifest(settings.bundle)


def _load_runtime(settings: Settings):
    """Export the demo bundle if asked (torch side, once, cached), then open and warm the runtime."""
    from service.runtime import BundleRuntime

    bundle = settings.bundle
    if bundle is None:
        from model.export import export_demo_bundle  # torch: only in demo mode

        logger.warning(DEMO_WARNING)
        bundle = export_demo_bundle(settings.demo_dir)
    return BundleRuntime(bundle, providers=settings.provider_list, intra_op_threads=settings.intra_op_threads,
                         inter_op_threads=settings.inter_op_threads)


async def _start(state: ServiceState) -> None:
    try:
        if state.runtime is None:
            state.runtime = await asyncio.to_thread(_load_runtime, state.settings)
        features = FeatureService(state.runtime, state.settings, state.metrics)
        features.batcher.start()
        state.features = features
        if state.runtime.demo:
            logger.warning(DEMO_WARNING)
        logger.info("ready: %s", state.runtime.describe() if hasattr(state.runtime, "describe") else "")
    except Exception as exc:
        state.load_error = str(exc)
        logger.error("model load failed: %s", exc, exc_info=not getattr(exc, "user_facing", False))
        if state.on_load_failure is not None:
            state.on_load_failure()


@contextlib.asynccontextmanager
async def lifespan(app: FastAPI):
    state: ServiceState = app.state.service
    if state.runtime is None:
        check_settings(state.settings)
    loader = asyncio.create_task(_start(state))
    try:
        yield
    finally:
        if not loader.done():
            loader.cancel()
        with contextlib.suppress(BaseException):
            await loader
        if state.features is not None:
            await state.features.batcher.stop()


class MetricsMiddleware:
    """Pure ASGI middleware (keeps ``request.is_disconnected`` working): counts and times requests."""

    def __init__(self, app, metrics: ServiceMetrics, endpoints: set[str]):
        self.app = app
        self.metrics = metrics
        self.endpoints = endpoints

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope.get("path", "")
        endpoint = path if path in self.endpoints else ("/static" if path.startswith("/static/") else "other")
        status = {"code": 500}
        started = time.perf_counter()

        async def send_and_record(message):
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_and_record)
        finally:
            self.metrics.latency.labels(endpoint).observe(time.perf_counter() - started)
            self.metrics.requests.labels(endpoint, str(status["code"])).inc()


def create_app(settings: Settings | None = None, runtime=None) -> FastAPI:
    """The service application.

    Args:
        settings: configuration; None reads ``LIFT_*`` from the environment.
        runtime: an already loaded ``BundleRuntime`` to serve (tests, benchmarks); None loads the
            bundle named by the settings during startup.
    """
    from service.routes import router

    settings = settings or get_settings()
    logging.getLogger("lift").setLevel(settings.log_level.upper())
    app = FastAPI(
        title="LiFT dense features",
        version="1",
        summary="Dense ViT descriptors upsampled by LiFT: features, click similarity maps, keypoint matches.",
        description=(
            "Coordinates `x`, `y` are in the ORIGINAL uploaded image's pixels (after EXIF orientation), "
            "origin at the top-left corner, x right, y down. Every error is JSON "
            '`{"error": {"code": "...", "message": "..."}}`. Uploads return a feature id (header '
            "`X-Feature-Id`) that later requests can send instead of the image."
        ),
        lifespan=lifespan,
    )
    app.state.service = ServiceState(settings, runtime)
    app.dependency_overrides[get_settings] = lambda: settings
    install_error_handlers(app)
    app.include_router(router)
    if STATIC_DIR.is_dir():
        app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
    if settings.cors_origin_list:
        app.add_middleware(CORSMiddleware, allow_origins=settings.cors_origin_list, allow_methods=["GET", "POST"],
                           allow_headers=["*"], expose_headers=EXPOSED_HEADERS)
    endpoints = {r.path for r in router.routes}
    endpoints |= {path for r in app.routes if isinstance(path := getattr(r, "path", None), str)}
    app.add_middleware(MetricsMiddleware, metrics=app.state.service.metrics, endpoints=endpoints)
    return app


__all__ = ["create_app", "ServiceState", "ConfigError", "DEMO_WARNING", "error_body"]
