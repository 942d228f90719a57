"""Demo mode, orchestrated above both sides: the torch-side exporter writes an untrained demo bundle
(``lift_serve.model.demo.export_demo_bundle``) and the service, which never imports torch, is
handed that exporter. ``lift serve --demo`` uses :func:`export_demo`; for uvicorn use
``LIFT_DEMO=true uvicorn --factory lift_serve.demo:create_app``.
"""

from __future__ import annotations

from pathlib import Path


class DemoUnavailable(RuntimeError):
    """torch is not installed here, so no demo bundle can be exported."""

    user_facing = True


def export_demo(demo_dir: Path) -> Path:
    """Export (or reuse) the demo bundle in ``demo_dir``; needs the ``train`` extra (torch)."""
    try:
        from lift_serve.model.demo import export_demo_bundle
    except ImportError as exc:
        raise DemoUnavailable(
            f"demo mode exports a bundle with torch, which is not installed here ({exc}); install the 'train' "
            "extra, or serve a bundle exported elsewhere with --bundle DIR (LIFT_BUNDLE)"
        ) from None
    return export_demo_bundle(demo_dir)


def create_app(settings=None):
    """The service app (settings from ``LIFT_*``) with the demo exporter plugged in."""
    from lift_serve.service.app import create_app as create_service_app

    return create_service_app(settings, demo_exporter=export_demo)
