"""``reconcile --every``: the loop and its metrics, with passes scripted by the test."""

from __future__ import annotations

import threading
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

import pytest
from prometheus_client import generate_latest

from chargify_stream.base.errors import ConfigError, TransientError
from chargify_stream.reconcile_metrics import ReconcileMetrics, run_forever
from chargify_stream.reconcile_report import Report, Webhook, Window

NOW = datetime(2026, 12, 5, 12, 0, tzinfo=UTC)


def report(missing: int, replayed: int, still: list[int] | None = None) -> Report:
    r = Report(Window(NOW - timedelta(days=2), NOW), dry_run=False)
    r.missing = [
        Webhook(i, "payment_success", NOW, "failed", None, "503 (retry 5 of 5)", None)
        for i in range(missing)
    ]
    r.replayed = list(range(replayed))
    r.still_missing = still
    r.waited = None if still is None else 1.0
    return r


def scripted(*steps: Report | Exception) -> tuple[Callable[[], Report], threading.Event]:
    """A pass function returning (or raising) each step in turn, then stopping the loop."""
    stop = threading.Event()
    queue = list(steps)

    def one_pass() -> Report:
        step = queue.pop(0)
        if not queue:
            stop.set()
        if isinstance(step, Exception):
            raise step
        return step

    return one_pass, stop


def value(metrics: ReconcileMetrics, name: str) -> float:
    for line in generate_latest(metrics.registry).decode().splitlines():
        if line.startswith(f"{name} "):
            return float(line.split()[1])
    raise AssertionError(f"{name} not exported")


def test_passes_feed_the_metrics_and_failures_do_not_stop_the_loop(
    capsys: pytest.CaptureFixture[str],
) -> None:
    one_pass, stop = scripted(
        report(3, 3), TransientError("Kafka is unreachable"), report(1, 1, still=[0])
    )
    metrics = ReconcileMetrics()
    assert run_forever(one_pass, every=0.01, port=0, metrics=metrics, stop=stop) == 0
    assert value(metrics, "reconcile_replayed_total") == 4
    assert value(metrics, "reconcile_missing") == 1  # the last pass: still missing after --wait
    assert value(metrics, "reconcile_failures_total") == 1
    assert value(metrics, "reconcile_last_success_timestamp_seconds") > 0
    assert capsys.readouterr().out.count("window: ") == 2  # one report per completed pass


def test_a_rejected_key_ends_the_loop() -> None:
    one_pass, stop = scripted(report(0, 0), ConfigError("Chargify rejected CHARGIFY_API_KEY"))
    with pytest.raises(ConfigError, match="CHARGIFY_API_KEY"):
        run_forever(one_pass, every=0.01, port=0, stop=stop)
