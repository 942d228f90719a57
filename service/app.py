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
from collections.abc import Callable
from pathlib import Path

from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware
from fastapi.staticfiles import StaticFiles
from lift_serve.service.auth import ApiKeyMiddleware
from lift_serve.service.codec import ImageError
from lift_serve.service.docs import install_docs
from lift_serve.service.errors import error_body, install_error_handlers
from lift_serve.service.features import FeatureService
from lift_serve.service.metrics import ServiceMetrics
from lift_serve.service.predictor import PredictionError
from lift_serve.service.settings import Settings, get_settings
from lift_serve.service.state import DEMO_WARNING, STATIC_DIR, ServiceState, weights_warning
from lift_serve.service.timing import ServerTimingMiddleware

logger = logging.getLogger("lift.service")

# Headers a browser page may read from a cross-origin response.
EXPOSED_HEADERS = ["X-Feature-Id", "X-Target-Feature-Id", "X-Feature-Id-A", "X-Feature-Id-B", "X-Feature-Shape",
                   "X-Feature-Stride", "X-Input-Size", "X-Image-Size", "X-Query-Cell", "X-Colour-Range",
                   "X-Basis-Feature-Id", "X-PCA-Explained-Variance", "Retry-After", "Server-Timing"]


class ConfigError(ValueError):
    """The settings cannot work (e.g. neither a bundle nor demo mode); the message says what to do."""

    user_facing = True


NO_BUNDLE_MESSAGE = (
    "no bundle to serve: pass --bundle DIR (or set LIFT_BUNDLE) to a bundle made with "
    "`lift export --checkpoint LIFT.safetensors --out DIR`, or try the API with an untrained demo model: "
    "`lift serve --demo` (LIFT_DEMO=true)"
)




def check_settings(settings: Settings, bundle_source: bool = False) -> None:
    """Fail fast on settings that cannot work (raises ConfigError or the bundle's BundleError);
    ``bundle_source``: the bundle is made at start-up (a named model), so none is needed yet."""
    if settings.bundle is None and not settings.demo and not bundle_source:
        raise ConfigError(NO_BUNDLE_MESSAGE)
    try:
        settings.api_key_set()
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    if settings.bundle is not None:
        from lift_serve.service.runtime import read_manifest

        read_manifest(settings.bundle)


def _load_runtime(settings: Settings, demo_exporter: Callable[[Path], Path] | None,
                  bundle_source: Callable[[], Path] | None = None):
    """Export the demo bundle if asked (through the exporter the caller injected: the service never
    imports the torch side), then open and warm the runtime."""
    from lift_serve.service.runtime import open_runtime

    bundle = settings.bundle
    if bundle is None and bundle_source is not None:
        bundle = bundle_source()
    if bundle is None:
        if demo_exporter is None:
            raise ConfigError(
                "demo mode (LIFT_DEMO=true without LIFT_BUNDLE) exports its bundle with the torch side: start it "
                "with `lift serve --demo` or `uvicorn --factory lift_serve.demo:create_app`, or set LIFT_BUNDLE"
            )
        logger.warning(DEMO_WARNING)
        bundle = demo_exporter(settings.demo_dir)
    runtime = open_runtime(bundle, kind=settings.runtime, **runtime_options(settings))
    check_required_provider(settings.require_provider, list(getattr(runtime, "active_providers", [])))
    return runtime


def runtime_options(settings: Settings) -> dict:
    """The constructor options of the runtime ``settings.runtime`` names, from the settings."""
    if settings.runtime == "triton":
        return {"url": settings.triton_url, "model_prefix": settings.triton_model_prefix,
                "timeout_s": settings.request_timeout_s, "startup_timeout_s": settings.triton_startup_timeout_s}
    from lift_serve.service.ort_options import GpuOptions

    gpu = GpuOptions(max_batch_size=settings.effective_batch_size, trt_fp16=settings.trt_fp16,
                     trt_engine_cache_dir=settings.trt_engine_cache_dir,
                     trt_max_workspace_bytes=settings.trt_max_workspace_bytes, trt_profiles=settings.trt_profiles,
                     cudnn_conv_algo_search=settings.cudnn_conv_algo_search, cuda_device_id=settings.cuda_device_id)
    return {"providers": settings.provider_list, "intra_op_threads": settings.intra_op_threads,
            "inter_op_threads": settings.inter_op_threads, "gpu_options": gpu, "warmup_mode": settings.warmup,
            "spinning": settings.ort_spinning}


def check_required_provider(required: str, active: list[str]) -> None:
    """LIFT_REQUIRE_PROVIDER: refuse to serve on another provider than the one asked for (a GPU
    host that silently runs on the CPU is slower by orders of magnitude)."""
    if not required:
        return
    from lift_serve.service.ort_runtime import PROVIDERS

    if active and active[0] == "triton":
        raise ConfigError(
            f"LIFT_REQUIRE_PROVIDER={required} is for ONNX Runtime in this process, but LIFT_RUNTIME=triton runs "
            "the graphs in a Triton server, which chooses its own devices (instance_group in its config.pbtxt): "
            "unset LIFT_REQUIRE_PROVIDER"
        )
    if not active or active[0] != PROVIDERS[required]:
        raise ConfigError(
            f"LIFT_REQUIRE_PROVIDER={required}, but ONNX Runtime runs on {active[0] if active else 'nothing'} "
            f"(LIFT_PROVIDERS={','.join(active) or '?'} active); check the GPU and its driver, that the image or "
            "environment has onnxruntime-gpu (the gpu extra), and the log above for the provider's own error"
        )


async def _start(state: ServiceState) -> None:
    try:
        if state.runtime is None:
            state.runtime = await asyncio.to_thread(_load_runtime, state.settings, state.demo_exporter,
                                                    state.bundle_source)
        features = FeatureService(state.runtime, state.settings, state.metrics)
        features.start()
        state.features = features
        warning = weights_warning(state.runtime)
        if warning:
            logger.warning(warning)
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
        check_settings(state.settings, bundle_source=state.bundle_source is not None)
    loader = asyncio.create_task(_start(state))
    try:
        yield
    finally:
        if not loader.done():
            loader.cancel()
        with contextlib.suppress(BaseException):
            await loader
        if state.features is not None:
            await state.features.stop()


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


def _install_engine_errors(app: FastAPI) -> None:
    """An inference server that fails while serving (LIFT_RUNTIME=triton): 503 + Retry-After to the
    client, without its address or its own text (those go to the log, for the operator)."""
    from lift_serve.service.errors import error_response
    from lift_serve.service.triton_runtime import TritonError

    @app.exception_handler(TritonError)
    async def _engine_error(_request, exc: TritonError):
        logger.warning("inference server error: %s", exc.message)
        return error_response(503, exc.code, "the inference server did not answer this request; retry in a few "
                              "seconds (the operator finds the reason in the service's log)", {"Retry-After": "5"})


def create_app(settings: Settings | None = None, runtime=None,
               demo_exporter: Callable[[Path], Path] | None = None,
               bundle_source: Callable[[], Path] | None = None) -> FastAPI:
    """The service application.

    Args:
        settings: configuration; None reads ``LIFT_*`` from the environment.
        runtime: an already opened ``Runtime`` to serve (tests, benchmarks); None loads the
            bundle named by the settings during startup.
        demo_exporter: ``demo_dir -> bundle dir``, used when the settings ask for demo mode without
            a bundle; injected by ``lift_serve.demo`` (torch side), never imported from here.
        bundle_source: ``() -> bundle dir``, run at start-up (after the port opens) when the settings
            name no bundle: ``lift serve --model`` exports a named model there on first use.
    """
    from lift_serve.service.routes import router

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
        # No trailing-slash redirects: Starlette builds their Location from the Host header, so any
        # client could make the server redirect to a host of its choosing. /v1/models/ is a 404.
        redirect_slashes=False,
        docs_url=None,  # /docs comes from the packaged Swagger UI (service/docs.py), not a CDN
        redoc_url=None,
    )
    app.state.service = ServiceState(settings, runtime, demo_exporter, bundle_source)
    app.dependency_overrides[get_settings] = lambda: settings
    install_error_handlers(app, domain_errors={PredictionError: 422, ImageError: None})
    _install_engine_errors(app)
    app.include_router(router)
    install_docs(app)
    if STATIC_DIR.is_dir():
        app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
    keys = settings.api_key_set()
    if keys:  # inside CORS (a browser's preflight carries no key), outside the routes
        app.add_middleware(ApiKeyMiddleware, keys=keys)
    if settings.cors_origin_list:
        app.add_middleware(CORSMiddleware, allow_origins=settings.cors_origin_list, allow_methods=["GET", "POST"],
                           allow_headers=["*"], expose_headers=EXPOSED_HEADERS)
    app.add_middleware(ServerTimingMiddleware, observe=app.state.service.metrics.observe_stage)
    endpoints = {r.path for r in router.routes}
    endpoints |= {path for r in app.routes if isinstance(path := getattr(r, "path", None), str)}
    app.add_middleware(MetricsMiddleware, metrics=app.state.service.metrics, endpoints=endpoints)
    return app


__all__ = ["create_app", "ServiceState", "ConfigError", "DEMO_WARNING", "error_body"]
