"""``make test`` set-up: make sure the servers the tests start are installed.

Installs what is missing (redis-server from apt; mongod comes with the dev wheel) so
the test session itself only starts processes. Also Debian's ``chromium`` for the
browser tests (Playwright drives it through ``executable_path``): when it cannot be
installed the run goes on, the reason is written to ``CHROMIUM_UNAVAILABLE`` and the
browser tests skip with it (outside CI; with ``CI=true`` they fail instead). And the
commands some tests run: nginx, docker-compose and openssl installed from apt, promtool
copied out of apt's prometheus package (see EXTRACTED_TOOLS).
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

from deploy.local.servers import (
    SetupError,
    _apt_extract,
    _apt_install,
    ensure_mongod,
    ensure_redis_server,
)

ROOT = Path(__file__).resolve().parents[2]
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_UNAVAILABLE = ROOT / ".var" / "chromium-unavailable.txt"


def ensure_chromium() -> str | None:
    """Path of Chromium, installed from apt when missing; None (reason recorded) if it cannot be."""
    CHROMIUM_UNAVAILABLE.unlink(missing_ok=True)
    if not CHROMIUM.exists():
        try:
            _apt_install("chromium")
        except (SetupError, OSError) as exc:
            reason = f"Debian's chromium could not be installed: {exc}"
        else:
            reason = f"{CHROMIUM} is still missing after apt-get install chromium"
        if not CHROMIUM.exists():
            CHROMIUM_UNAVAILABLE.parent.mkdir(parents=True, exist_ok=True)
            CHROMIUM_UNAVAILABLE.write_text(reason + "\n")
            print(f"[prepare] {reason}; the browser tests will be skipped", file=sys.stderr)
            return None
    return str(CHROMIUM)


# Commands the tests run (tests/test_operations.py; openssl makes the certificates of
# tests/test_wire.py's TLS server), and their apt packages. When one cannot be had
# those tests skip with the reason (fail under CI=true).
APT_TOOLS = {"nginx": "nginx", "docker-compose": "docker-compose", "openssl": "openssl"}
# Commands taken out of their apt package into TOOLS_BIN rather than installed with it:
# installing prometheus would also start a Prometheus server on :9090 and, as a
# recommendation, node-exporter on :9100 (the worker's default port) on a host with
# systemd, where the tests need only promtool.
EXTRACTED_TOOLS = {"promtool": "prometheus"}
TOOLS_BIN = ROOT / ".var" / "tools" / "bin"
SEARCH_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:" + os.environ.get("PATH", "")


def ensure_tool(command: str, package: str) -> str | None:
    """Path of ``command``, installed from apt ``package`` when missing; None if it cannot be."""
    found = shutil.which(command, path=SEARCH_PATH)
    if found:
        return found
    try:
        _apt_install(package)
    except (SetupError, OSError) as exc:
        print(f"[prepare] {command}: {exc}; the tests that need it will skip", file=sys.stderr)
        return None
    return shutil.which(command, path=SEARCH_PATH)


def ensure_extracted(command: str, package: str) -> str | None:
    """Path of ``command``: on PATH, in TOOLS_BIN, else copied there out of apt's
    ``package``; None if it cannot be had."""
    found = shutil.which(command, path=f"{TOOLS_BIN}:{SEARCH_PATH}")
    if found:
        return found
    try:
        _apt_extract(package, f"usr/bin/{command}", TOOLS_BIN / command)
    except (SetupError, OSError, ValueError) as exc:
        print(f"[prepare] {command}: {exc}; the tests that need it will skip", file=sys.stderr)
        return None
    return str(TOOLS_BIN / command)


def main() -> int:
    """Exit 1 with a clear sentence when a server cannot be had (a missing browser is not fatal)."""
    try:
        print(f"[prepare] redis-server: {ensure_redis_server()}", flush=True)
        print(f"[prepare] mongod: {ensure_mongod()}", flush=True)
    except SetupError as exc:
        print(f"[prepare] {exc}", file=sys.stderr)
        return 1
    chromium = ensure_chromium()
    if chromium:
        print(f"[prepare] chromium: {chromium}", flush=True)
    for command, package in APT_TOOLS.items():
        print(f"[prepare] {command}: {ensure_tool(command, package) or 'missing'}", flush=True)
    for command, package in EXTRACTED_TOOLS.items():
        found = ensure_extracted(command, package)
        print(f"[prepare] {command}: {found or 'missing'}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
