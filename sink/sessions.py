"""Restart a sink background thread's session after a fault, with backoff.

The re-driver, the customer relay and the outcome recorder each run in a thread beside the
sink, and none of them may take the sink down: a session (clients built, then a loop until
stopped) that fails is logged, counted, and started over from the committed state (Postgres
rows, Kafka offsets). The pause doubles from 1 s to 30 s, starts again at 1 s after a session
that lasted over a minute, and is the longest at once when the tables are missing (the
migration has not run: an operator must act).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

import psycopg
from prometheus_client import Counter

from chargify_stream.retry import backoff

__all__ = ["run_sessions"]

FIRST_PAUSE_S = 1.0
MOST_PAUSE_S = 30.0
# A session that lasted this long was healthy: the next fault starts the pauses again.
HEALTHY_S = 60.0


def run_sessions(
    session: Callable[[], None],
    *,
    stop: threading.Event,
    faults: Counter,
    log: logging.Logger,
    name: str,
    missing: str,
    first: float = FIRST_PAUSE_S,
    most: float = MOST_PAUSE_S,
) -> None:
    """Run ``session`` until ``stop`` is set, starting it over after each fault.

    ``name`` prefixes the log lines; ``missing`` says what a missing table means;
    ``first`` and ``most`` bound the pauses (seconds).
    """
    pauses = backoff(first, most)
    while not stop.is_set():
        started = time.monotonic()
        try:
            session()
        except psycopg.errors.UndefinedTable:
            faults.inc()
            log.error("%s: %s; run `chargify-stream migrate`", name, missing)
            pauses = backoff(most, most)
        except Exception as exc:
            faults.inc()
            log.warning("%s fault (%s: %s); restarting", name, type(exc).__name__, exc)
            if time.monotonic() - started > HEALTHY_S:
                pauses = backoff(first, most)
        if stop.wait(next(pauses)):
            break
