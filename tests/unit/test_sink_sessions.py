"""A background thread's session is started over after a fault, and never raises."""

from __future__ import annotations

import logging
import threading
import time

import psycopg
import pytest
from prometheus_client import CollectorRegistry, Counter

from sink.sessions import run_sessions

log = logging.getLogger("test.sessions")


def test_faults_are_counted_logged_and_the_session_started_over_with_backoff(
    caplog: pytest.LogCaptureFixture,
) -> None:
    stop = threading.Event()
    registry = CollectorRegistry()
    faults = Counter("faults", "faults", registry=registry)
    started: list[float] = []

    def session() -> None:
        started.append(time.monotonic())
        if len(started) == 1:
            raise psycopg.errors.UndefinedTable('relation "parked_events" does not exist')
        if len(started) == 2:
            raise ValueError("broker away")
        stop.set()

    with caplog.at_level(logging.WARNING, logger="test.sessions"):
        run_sessions(
            session,
            stop=stop,
            faults=faults,
            log=log,
            name="re-driver",
            missing="table parked_events is missing",
            first=0.01,
            most=0.2,
        )

    assert len(started) == 3
    assert registry.get_sample_value("faults_total") == 2
    messages = [r.getMessage() for r in caplog.records]
    assert messages[0] == (
        "re-driver: table parked_events is missing; run `chargify-stream migrate`"
    )
    assert messages[1] == "re-driver fault (ValueError: broker away); restarting"
    # A missing table waits the longest pause at once, and the pauses stay there.
    assert started[1] - started[0] >= 0.2
    assert started[2] - started[1] >= 0.2


def test_a_stop_ends_the_pause_at_once() -> None:
    stop = threading.Event()
    faults = Counter("faults", "faults", registry=CollectorRegistry())

    def session() -> None:
        threading.Timer(0.05, stop.set).start()
        raise ValueError("down")

    began = time.monotonic()
    run_sessions(
        session, stop=stop, faults=faults, log=log, name="relay", missing="x", first=30, most=30
    )
    assert time.monotonic() - began < 5
