"""Structured logs: one JSON object per line on stderr, level from LOG_LEVEL.

Callers pass context in ``extra={...}``; tokens and message texts are never passed.
"""

from __future__ import annotations

import logging
import sys
import time
from typing import Any

import orjson

_STANDARD = set(logging.LogRecord("", 0, "", 0, "", None, None).__dict__) | {"message", "asctime"}


class JsonFormatter(logging.Formatter):
    """Formats a record as one JSON line with its ``extra`` fields."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": round(record.created, 3),
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key, value in record.__dict__.items():
            if key not in _STANDARD and not key.startswith("_"):
                entry[key] = value
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return orjson.dumps(entry, default=str).decode()


def setup_logging(level: str, **static: Any) -> None:
    """Route the root logger to stderr as JSON lines; ``static`` fields go on every line."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    if static:
        handler.addFilter(_StaticFields(static))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # aiohttp's access log is one line per HTTP request: noise at INFO on a busy node.
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
    # At DEBUG, pymongo.command logs every command with its documents (message texts,
    # token digests): PyMongo logs from INFO up only, whatever LOG_LEVEL says.
    logging.getLogger("pymongo").setLevel(max(root.getEffectiveLevel(), logging.INFO))


class _StaticFields(logging.Filter):
    def __init__(self, fields: dict[str, Any]) -> None:
        super().__init__()
        self.fields = fields

    def filter(self, record: logging.LogRecord) -> bool:
        for key, value in self.fields.items():
            setattr(record, key, value)
        return True


def describe_error(exc: BaseException) -> str:
    """An exception for a log line, without anything it may carry from a payload.

    MongoDB write errors quote the offending document (message texts); those are
    reduced to their type and error codes. Anything else keeps its first 200 characters.
    """
    details = getattr(exc, "details", None)
    # Only a server's reply (a dict) can quote a document; a server selection timeout's
    # details are a list of the servers tried, and its message describes only them.
    if type(exc).__module__.startswith("pymongo") and isinstance(details, dict):
        errors = details.get("writeErrors")
        codes = sorted({e.get("code") for e in errors or ()} or {details.get("code")})
        return f"{type(exc).__name__}(codes={codes})"
    return f"{type(exc).__name__}: {str(exc)[:200]}"
