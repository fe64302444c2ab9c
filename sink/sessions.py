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
from typing import Self

import psycopg
from prometheus_client import Counter

from chargify_stream.base.retry import backoff

__all__ = ["SessionThread", "run_sessions"]

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


class SessionThread:
    """A daemon thread running :meth:`_session` under :func:`run_sessions` until stopped.

    Subclasses implement ``_session``, which returns once ``self._stop`` is set.
    """

    def __init__(
        self, *, thread_name: str, name: str, missing: str, faults: Counter, log: logging.Logger
    ) -> None:
        self._name, self._missing, self._faults, self._log = name, missing, faults, log
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=thread_name, daemon=True)

    def start(self) -> Self:
        self._thread.start()
        return self

    def stop(self, timeout: float = 15.0) -> None:
        """Ask the thread to finish its current step, and wait for it (bounded)."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout)

    def _run(self) -> None:
        run_sessions(
            self._session,
            stop=self._stop,
            faults=self._faults,
            log=self._log,
            name=self._name,
            missing=self._missing,
        )

    def _session(self) -> None:
        raise NotImplementedError
