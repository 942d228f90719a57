"""The API reference at ``/docs``, served without a CDN.

FastAPI's default ``/docs`` page loads Swagger UI's script and stylesheet from a CDN, so it is blank
on a machine without internet. Here the same page is built with FastAPI's own
``get_swagger_ui_html``, pointing at Swagger UI's files as packaged by ``swagger-ui-bundle-v2``
(Swagger UI 5, which reads the OpenAPI 3.1 that FastAPI writes) and served under ``/docs/assets/``.
ReDoc, which has no packaged copy, is not offered.
"""

from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import HTMLResponse
from fastapi.staticfiles import StaticFiles

ASSETS = "/docs/assets"


def install_docs(app: FastAPI) -> None:
    """``/docs`` from the packaged Swagger UI (call on an app made with ``docs_url=None``)."""
    from swagger_ui_bundle import swagger_ui_path

    app.mount(ASSETS, StaticFiles(directory=str(swagger_ui_path)), name="docs-assets")

    @app.get("/docs", include_in_schema=False)
    async def docs(request: Request) -> HTMLResponse:
        root = request.scope.get("root_path", "").rstrip("/")
        return get_swagger_ui_html(openapi_url=f"{root}{app.openapi_url}", title=f"{app.title} — API reference",
                                   swagger_js_url=f"{root}{ASSETS}/swagger-ui-bundle.js",
                                   swagger_css_url=f"{root}{ASSETS}/swagger-ui.css",
                                   swagger_favicon_url=f"{root}{ASSETS}/favicon-32x32.png",
                                   oauth2_redirect_url=None)
