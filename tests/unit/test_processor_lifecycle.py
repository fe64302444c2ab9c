"""``processors.lifecycle``: start-up retries while the broker is away, and a stop that
hangs is cut short with the stacks."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import time

import pytest
from confluent_kafka import KafkaError, KafkaException

from chargify_stream.base.errors import TransientError
from chargify_stream.processors import lifecycle


def test_a_broker_away_at_start_is_waited_for() -> None:
    calls = []

    def prepare() -> str:
        calls.append(time.monotonic())
        if len(calls) == 1:
            raise TransientError("away")
        if len(calls) == 2:
            raise KafkaException(KafkaError(KafkaError._TRANSPORT))
        return "ready"

    assert lifecycle.retry_at_start("preparing", prepare, pause=0.05) == "ready"
    assert len(calls) == 3
    assert calls[2] - calls[1] >= 0.09  # the pause grows


def test_the_attempts_are_bounded(caplog: pytest.LogCaptureFixture) -> None:
    def prepare() -> None:
        raise TransientError("away")

    with pytest.raises(TransientError):
        lifecycle.retry_at_start("preparing", prepare, pause=0.001)
    assert f"attempt {lifecycle.START_ATTEMPTS - 1} of {lifecycle.START_ATTEMPTS}" in caplog.text


def test_other_errors_are_not_retried() -> None:
    def prepare() -> None:
        raise ValueError("a bug")

    with pytest.raises(ValueError):
        lifecycle.retry_at_start("preparing", prepare, pause=0.001)


_HANGING_STOP = textwrap.dedent(
    """
    import sys, time
    from chargify_stream.base.logs import setup_logging
    from chargify_stream.processors import lifecycle
    setup_logging("INFO")

    def stuck_in_flush():
        time.sleep(30)

    call_off = lifecycle.exit_if_still_running(0.5)
    if sys.argv[1] == "done":
        call_off()  # the stop finished in time
        time.sleep(1.5)
        print("still here")
        sys.exit(0)
    stuck_in_flush()
    """
)


def run_hanging_stop(how: str) -> subprocess.CompletedProcess[str]:
    """Run ``_HANGING_STOP`` in its own process; ``how``: ``"stuck"``, or ``"done"`` in time."""
    return subprocess.run(
        [sys.executable, "-c", _HANGING_STOP, how],
        capture_output=True,
        text=True,
        timeout=20,
        check=False,
    )


def test_a_stop_that_hangs_is_cut_short_with_the_stacks() -> None:
    started = time.monotonic()
    done = run_hanging_stop("stuck")
    assert done.returncode == 1, done.stderr
    assert time.monotonic() - started < 15
    output = done.stdout + done.stderr
    assert "did not stop within 0.5s" in output, output
    assert "in stuck_in_flush" in output, output


def test_a_stop_done_in_time_calls_the_watchdog_off() -> None:
    done = run_hanging_stop("done")
    assert done.returncode == 0, done.stderr
    assert "still here" in done.stdout
    assert "did not stop" not in done.stderr
