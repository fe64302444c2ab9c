"""``processors.worker``: a processor whose start failed runs itself again, a bounded
number of times; a processor whose stop hangs exits anyway."""

from __future__ import annotations

import pathlib
import subprocess
import sys
import textwrap
import time
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


_HANGING_STOP = textwrap.dedent(
    """
    import asyncio, sys, time
    from chargify_stream.logs import setup_logging
    from processors import worker
    setup_logging("INFO")

    async def waits_for_ever():
        await asyncio.Event().wait()

    def stuck_in_flush():
        time.sleep(30)

    async def main():
        task = asyncio.ensure_future(waits_for_ever())
        call_off = worker._exit_if_still_running(0.5, asyncio.get_running_loop())
        if sys.argv[1] == "stuck":
            stuck_in_flush()  # blocks the loop itself
        if sys.argv[1] == "done":
            call_off()  # the stop finished in time
            time.sleep(1.5)
            print("still here")
            sys.exit(0)
        await task

    asyncio.run(main())
    """
)


@pytest.mark.parametrize(
    ("loop", "shown"),
    [
        ("alive", "in waits_for_ever"),  # each task and what it awaits
        ("stuck", "in stuck_in_flush"),  # the loop runs nothing: each thread's stack
    ],
)
def test_a_stop_that_hangs_is_cut_short_with_the_stacks(loop: str, shown: str) -> None:
    started = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-c", _HANGING_STOP, loop],
        capture_output=True,
        text=True,
        timeout=20,
        check=False,
    )
    assert done.returncode == 1, done.stderr
    assert time.monotonic() - started < 15
    output = done.stdout + done.stderr
    assert "did not stop within 0.5s of the signal" in output, output
    assert shown in output, output


def test_a_stop_done_in_time_calls_the_watchdog_off() -> None:
    done = subprocess.run(
        [sys.executable, "-c", _HANGING_STOP, "done"],
        capture_output=True,
        text=True,
        timeout=20,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert "still here" in done.stdout
    assert "did not stop" not in done.stderr


_BROKER_AWAY_AT_START = textwrap.dedent(
    """
    import sys
    from unittest import mock
    from confluent_kafka import KafkaError, KafkaException
    from chargify_stream.errors import TransientError
    from chargify_stream.settings import Settings
    from processors import worker

    settings = Settings(
        kafka_bootstrap_servers="127.0.0.1:9",
        processor_data_dir=sys.argv[2],
        database_url="postgresql://x@127.0.0.1:9/x",
        chargify_shared_keys="k",
    )
    away = KafkaException(KafkaError(KafkaError._TRANSPORT))
    with (
        mock.patch.object(worker, "_start_again") as start_again,
        mock.patch.object(worker, "_partition_counts", return_value={settings.topic("raw"): 3}),
        mock.patch.object(worker, "_check_changelogs"),
    ):
        if sys.argv[1] == "raw topics":
            with mock.patch.object(worker, "ensure_topics", side_effect=TransientError("away")):
                code = worker.run(settings)
        else:
            with (
                mock.patch.object(worker, "ensure_topics"),
                mock.patch.object(worker, "_create_changelogs", side_effect=away),
            ):
                code = worker.run(settings)
    print("code", code, "started again", start_again.call_count)
    """
)


@pytest.mark.parametrize("step", ["raw topics", "changelogs"])
def test_a_broker_away_while_preparing_the_topics_starts_again(
    step: str, tmp_path: pathlib.Path
) -> None:
    """As a Faust start that failed does: the changelogs are now created before Faust."""
    done = subprocess.run(  # a child: a Faust app leaves an event loop behind
        [sys.executable, "-c", _BROKER_AWAY_AT_START, step, str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert "code 1 started again 1" in done.stdout, done.stdout + done.stderr
    assert "preparing the topics failed" in done.stdout + done.stderr
