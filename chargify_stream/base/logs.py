"""Logging: one line per event to stderr, as text or JSON (``LOG_FORMAT``).

Both formats stamp each line in ISO-8601 UTC (``2026-12-05T07:14:15.123Z``) and carry no
terminal escape sequences: control characters in a message (a library's colour codes, a
cursor sequence) are replaced. ``json`` writes one object per line with stable keys:
``time``, ``level``, ``logger``, ``message``, and, when the code logging knows them,
``webhook_id``, ``event``, ``outcome`` and ``reason`` (passed as ``extra=``; see
:func:`fields`), plus ``error`` with the traceback of an exception.
"""

from __future__ import annotations

import json
import logging
import re
import sys
import time
from typing import Any

__all__ = ["FIELDS", "JsonFormatter", "TextFormatter", "fields", "setup_logging"]

# The keys a log call may add with ``extra=fields(...)``, in the order they are written.
FIELDS = ("webhook_id", "event", "outcome", "reason")
# Control characters but newline and tab: ESC starts every terminal sequence.
_CONTROL = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]|[\x00-\x08\x0b-\x1f\x7f]")


def fields(
    webhook_id: object = None,
    event: object = None,
    outcome: object = None,
    reason: object = None,
) -> dict[str, Any]:
    """``extra=`` for a log call about one webhook (``None`` values are left out)."""
    given = {"webhook_id": webhook_id, "event": event, "outcome": outcome, "reason": reason}
    return {k: str(v) for k, v in given.items() if v is not None}


def clean(text: str) -> str:
    """``text`` without terminal escape sequences or control characters (but newlines)."""
    return _CONTROL.sub("", text)


def utc_time(record: logging.LogRecord) -> str:
    stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
    return f"{stamp}.{int(record.msecs):03d}Z"


class TextFormatter(logging.Formatter):
    """``<time> <LEVEL> <logger> <message> [key=value ...]``."""

    def format(self, record: logging.LogRecord) -> str:
        line = f"{utc_time(record)} {record.levelname} {record.name} {record.getMessage()}"
        extra = " ".join(f"{k}={getattr(record, k)}" for k in FIELDS if hasattr(record, k))
        if extra:
            line = f"{line} [{extra}]"
        if record.exc_info:
            line = f"{line}\n{self.formatException(record.exc_info)}"
        return clean(line)


class JsonFormatter(logging.Formatter):
    """One JSON object per line (see the module docstring for the keys)."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "time": utc_time(record),
            "level": record.levelname,
            "logger": record.name,
            "message": clean(record.getMessage()),
        }
        for key in FIELDS:
            if hasattr(record, key):
                out[key] = getattr(record, key)
        if record.exc_info:
            out["error"] = clean(self.formatException(record.exc_info))
        return json.dumps(out, ensure_ascii=False, default=str)


def setup_logging(level: str = "INFO", fmt: str = "text") -> None:
    """Configure the root logger once per process."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # Client libraries are chatty at INFO; their warnings still show.
    for name in ("aiokafka", "faust", "mode", "uvicorn.access", "kafka"):
        logging.getLogger(name).setLevel(max(logging.WARNING, logging.getLevelName(level)))


def log_failure(
    logger: logging.Logger,
    message: str,
    *args: object,
    exc: BaseException,
    level: int = logging.WARNING,
) -> None:
    """Log a handled failure as one line, ``message: ExcType: reason``.

    The traceback follows only when ``logger`` is at DEBUG: a handled error (a record
    dead-lettered, a step retried) needs its reason in the log, not 35 lines of stack.
    """
    reason = " ".join(str(exc).split()) or "(no message)"
    logger.log(
        level,
        message + ": %s: %s",
        *args,
        type(exc).__name__,
        reason[:500],
        exc_info=exc if logger.isEnabledFor(logging.DEBUG) else None,
    )
