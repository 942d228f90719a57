"""Optional API keys: with ``LIFT_API_KEYS`` (or ``LIFT_API_KEYS_FILE``) set, every ``/v1`` request
and ``/metrics`` must carry ``Authorization: Bearer KEY``; health, readiness, the page and its
static files and the API reference stay open (orchestrators and browsers load those without a
key; the page then sends the key it is given).

A pure ASGI middleware, so that it answers before any body is read. Keys are compared in constant
time (``hmac.compare_digest``) against every accepted key, and are never logged or echoed.
"""

from __future__ import annotations

import hmac
import json

from lift_serve.service.errors import error_body

OPEN_PATHS = ("/healthz", "/readyz", "/", "/docs", "/openapi.json", "/docs/oauth2-redirect", "/favicon.ico")
OPEN_PREFIXES = ("/static/", "/docs/assets/")


def _needs_key(path: str) -> bool:
    return not (path in OPEN_PATHS or path.startswith(OPEN_PREFIXES))


def _presented_key(headers: list[tuple[bytes, bytes]]) -> str | None:
    for name, value in headers:
        if name.lower() == b"authorization":
            scheme, _, token = value.decode("latin-1").partition(" ")
            return token.strip() if scheme.lower() == "bearer" and token.strip() else None
    return None


def key_accepted(presented: str | None, keys: frozenset[str]) -> bool:
    if presented is None:
        return False
    given = presented.encode()
    # compare with every key (no early exit), so timing says nothing about which one came close
    results = [hmac.compare_digest(given, key.encode()) for key in keys]
    return any(results)


class ApiKeyMiddleware:
    def __init__(self, app, keys: frozenset[str]):
        self.app = app
        self.keys = keys

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or not self.keys or not _needs_key(scope.get("path", "")):
            return await self.app(scope, receive, send)
        presented = _presented_key(scope.get("headers", []))
        if key_accepted(presented, self.keys):
            return await self.app(scope, receive, send)
        reason = "no API key was sent" if presented is None else "the API key is not valid"
        body = json.dumps(error_body("unauthorized", f"{reason}: send `Authorization: Bearer <key>` (the server "
                                     "was started with LIFT_API_KEYS)")).encode()
        await send({"type": "http.response.start", "status": 401, "headers": [
            (b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
            (b"www-authenticate", b'Bearer realm="lift-serve"')]})
        await send({"type": "http.response.body", "body": body})
