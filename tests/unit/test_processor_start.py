"""``processors.worker``: a processor whose start failed runs itself again, a bounded
number of times."""

from __future__ import annotations

import sys
from unittest import mock

import pytest

from processors import worker


def test_a_failed_start_executes_the_same_command_again(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("CHARGIFY_PROCESSOR_START_ATTEMPT", "2")
    monkeypatch.setattr(sys, "orig_argv", ["python", "-m", "chargify_stream", "processor"])
    with (
        mock.patch.object(worker.time, "sleep") as sleep,
        mock.patch.object(worker.os, "execv") as execv,
    ):
        worker._start_again()
    sleep.assert_called_once_with(4.0)
    execv.assert_called_once_with(
        sys.executable, [sys.executable, "-m", "chargify_stream", "processor"]
    )
    assert worker.os.environ["CHARGIFY_PROCESSOR_START_ATTEMPT"] == "3"


def test_the_first_failed_start_counts_as_attempt_one(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CHARGIFY_PROCESSOR_START_ATTEMPT", raising=False)
    with mock.patch.object(worker.time, "sleep"), mock.patch.object(worker.os, "execv"):
        worker._start_again()
    assert worker.os.environ["CHARGIFY_PROCESSOR_START_ATTEMPT"] == "2"


def test_the_attempts_are_bounded(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv("CHARGIFY_PROCESSOR_START_ATTEMPT", str(worker.START_ATTEMPTS))
    with (
        mock.patch.object(worker.time, "sleep") as sleep,
        mock.patch.object(worker.os, "execv") as execv,
    ):
        worker._start_again()
    execv.assert_not_called()
    sleep.assert_not_called()
    assert f"failed to start {worker.START_ATTEMPTS} times; giving up" in caplog.text
