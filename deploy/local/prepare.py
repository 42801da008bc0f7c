"""``make test`` set-up: make sure the servers the tests start are installed.

Installs what is missing (redis-server from apt; mongod comes with the dev wheel) so
the test session itself only starts processes.
"""

from __future__ import annotations

import sys

from deploy.local.servers import SetupError, ensure_mongod, ensure_redis_server


def main() -> int:
    """Exit 1 with a clear sentence when a server cannot be had."""
    try:
        print(f"[prepare] redis-server: {ensure_redis_server()}", flush=True)
        print(f"[prepare] mongod: {ensure_mongod()}", flush=True)
    except SetupError as exc:
        print(f"[prepare] {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
