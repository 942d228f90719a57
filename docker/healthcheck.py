"""Container health check: exit 0 when the service answers GET /readyz with 200 (model loaded and
warmed), 1 otherwise. Used by the api image's HEALTHCHECK and by docker-compose.

Standard library only (the image has no curl). The port comes from LIFT_PORT like the service's.
"""

import os
import sys
import urllib.error
import urllib.request

port = os.environ.get("LIFT_PORT", "8000")
# The service is on this host: never go through HTTP_PROXY/HTTPS_PROXY, which urlopen would honour.
direct = urllib.request.build_opener(urllib.request.ProxyHandler({}))
try:
    with direct.open(f"http://127.0.0.1:{port}/readyz", timeout=4) as response:
        sys.exit(0 if response.status == 200 else 1)
except (urllib.error.URLError, OSError) as exc:  # HTTPError (503 while warming) is a URLError
    print(f"not ready: {exc}", file=sys.stderr)
    sys.exit(1)
