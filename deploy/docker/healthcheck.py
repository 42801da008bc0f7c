"""Container liveness probe: exit 0 when GET http://127.0.0.1:$HEALTH_PORT$HEALTH_PATH is 2xx.

Standard library only, so it works in the slim runtime image for either role
(gateway: HEALTH_PORT=8080, worker: HEALTH_PORT=9100).
"""

from __future__ import annotations

import os
import sys
import urllib.error
import urllib.request


def main() -> int:
    port = os.environ.get("HEALTH_PORT", "8080")
    path = os.environ.get("HEALTH_PATH", "/healthz")
    timeout = float(os.environ.get("HEALTH_TIMEOUT", "3"))
    url = f"http://127.0.0.1:{port}{path}"
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            status = response.status
    except urllib.error.HTTPError as exc:
        print(f"unhealthy: {url} -> HTTP {exc.code}", file=sys.stderr)
        return 1
    except (OSError, ValueError) as exc:
        print(f"unhealthy: {url} -> {exc}", file=sys.stderr)
        return 1
    if 200 <= status < 300:
        return 0
    print(f"unhealthy: {url} -> HTTP {status}", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
