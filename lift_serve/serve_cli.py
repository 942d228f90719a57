"""``lift serve``: run the HTTP service with uvicorn.

Flags override the ``LIFT_*`` environment variables (service/settings.py); everything not offered
as a flag (batching, cache, limits, providers, CORS ...) is set through the environment.
``--demo`` exports (once, cached in ``LIFT_DEMO_DIR``) an untrained demo bundle, which needs the
torch side (``train`` extra); its features are meaningless and the log, ``/v1/models`` and the README
say so.
"""

from __future__ import annotations

import argparse
import functools
import logging

HELP = "serve a bundle over HTTP (FastAPI + ONNX Runtime): features, click similarity maps, matches"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--bundle", default=None, metavar="DIR",
                        help="bundle directory from `lift export`, or hf://ORG/NAME[@REVISION][/PATH] "
                             "(env LIFT_BUNDLE)")
    parser.add_argument("--model", default=None, metavar="NAME",
                        help="a named model (`lift models`): exported once into the models cache, then served; "
                             "the export needs the torch side (train extra)")
    parser.add_argument("--checkpoint", default=None, metavar="PATH",
                        help="with --model: the upsampler weights when the model has no release of its own "
                             "(the LiFT models), a path or hf://ORG/NAME[@REVISION]/PATH")
    parser.add_argument("--demo", action="store_true", default=None,
                        help="serve an untrained demo bundle, exported once and cached; features are meaningless "
                             "(env LIFT_DEMO)")
    parser.add_argument("--demo-dir", default=None, metavar="DIR",
                        help="cache directory of the demo bundle (env LIFT_DEMO_DIR, default "
                             "~/.cache/lift-serve/demo-bundle)")
    parser.add_argument("--host", default=None, help="interface to bind (env LIFT_HOST, default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=None, help="TCP port (env LIFT_PORT, default 8000)")
    parser.add_argument("--log-level", default=None, choices=("critical", "error", "warning", "info", "debug"),
                        help="env LIFT_LOG_LEVEL, default info")


def build_settings(args: argparse.Namespace):
    """Settings from the environment with the flags on top (a ConfigError for invalid values)."""
    from pydantic import ValidationError

    from lift_serve.service.app import ConfigError
    from lift_serve.service.settings import Settings

    if sum(bool(getattr(args, name, None)) for name in ("bundle", "demo", "model")) > 1:
        raise ConfigError("--bundle, --model and --demo exclude each other: serve one of them")
    overrides = {name: getattr(args, name) for name in ("bundle", "demo", "demo_dir", "host", "port", "log_level")
                 if getattr(args, name, None) is not None}
    if args.demo:
        overrides["bundle"] = None  # --demo wins over a LIFT_BUNDLE in the environment
    try:
        return Settings(**overrides)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors())
        raise ConfigError(f"invalid setting ({problems}); fix the LIFT_* variable or flag") from None


# Libraries whose INFO lines (hundreds during an ONNX export) would bury the service's own log.
THIRD_PARTY_LOGGERS = ("onnxscript", "onnx_ir", "torch", "httpx", "httpcore", "huggingface_hub", "timm")


def quiet_third_party_logs(level: str) -> None:
    """Third-party loggers at WARNING unless the service logs at ``debug``."""
    if level != "debug":
        for name in THIRD_PARTY_LOGGERS:
            logging.getLogger(name).setLevel(logging.WARNING)


def named_model_bundle(name: str, checkpoint: str | None = None):
    """The bundle of named model ``name``: from the models cache, else exported there now (torch side)."""
    from lift_serve.hub.models import named_model
    from lift_serve.service.app import ConfigError

    model = named_model(name)
    try:
        from lift_serve.model.named import export_named
    except ImportError:
        raise ConfigError(f"--model {name} exports the model once with the torch side, which this installation "
                          "lacks: pip install 'lift-serve[train]', or export it on another machine with "
                          f"`lift export --model {name}` and serve the directory with --bundle") from None
    return export_named(model, checkpoint)


def run(args: argparse.Namespace) -> int:
    import uvicorn

    from lift_serve.http_server import server_options
    from lift_serve.memory import return_large_blocks_to_the_system
    from lift_serve.service.app import DEMO_WARNING, ConfigError, check_settings, create_app

    return_large_blocks_to_the_system()
    settings = build_settings(args)
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    quiet_third_party_logs(settings.log_level)
    bundle_source = None
    if getattr(args, "model", None):
        # Exported (first use) or found in the models cache by the start-up task, after the port is
        # open: meanwhile 503 not_ready with Retry-After, as for --demo.
        from lift_serve.hub.models import named_model

        named_model(args.model)  # an unknown name fails now, not after the port opened
        settings = settings.model_copy(update={"bundle": None})
        bundle_source = functools.partial(named_model_bundle, args.model, args.checkpoint)
    check_settings(settings, bundle_source=bundle_source is not None)
    demo_exporter = None
    if settings.bundle is None and settings.demo:
        # Exported by the app's start-up task, after the port is open: meanwhile /readyz and /v1 answer
        # 503 not_ready with Retry-After, and the page says it waits for the model.
        from lift_serve.demo import export_demo

        logging.getLogger("lift.service").warning(DEMO_WARNING)
        demo_exporter = export_demo
    app = create_app(settings, demo_exporter=demo_exporter, bundle_source=bundle_source)
    server = uvicorn.Server(uvicorn.Config(app, host=settings.host, port=settings.port, log_level=settings.log_level,
                                           access_log=settings.log_level == "debug", **server_options(settings)))
    state = app.state.service
    # The graphs load after the server starts (so /healthz answers meanwhile); a bundle that cannot
    # load (missing or corrupt graph) stops the command rather than leaving a server that only says 503.
    state.on_load_failure = lambda: setattr(server, "should_exit", True)
    try:
        server.run()
    except SystemExit:
        if server.started:
            raise
        raise ConfigError(f"cannot listen on {settings.host}:{settings.port} (the reason is logged above, e.g. the "
                          "port is in use); choose another with --port / LIFT_PORT or --host / LIFT_HOST") from None
    if state.load_error:
        what = settings.bundle or (f"model {args.model}" if getattr(args, "model", None) else "the demo bundle")
        raise ConfigError(f"cannot serve {what}: {state.load_error}")
    return 0
