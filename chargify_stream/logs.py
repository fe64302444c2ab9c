"""Logging: one line per event, key=value fields, to stderr."""

from __future__ import annotations

import logging
import sys


def setup_logging(level: str = "INFO") -> None:
    """Configure the root logger once per process."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        logging.Formatter("%(asctime)s %(levelname)s %(name)s %(message)s", "%Y-%m-%dT%H:%M:%S")
    )
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
