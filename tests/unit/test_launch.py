"""The one launcher: a child that exits early fails the wait at once with its log, a
child that ignores SIGTERM is killed and the stop says so."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import pytest

from chargify_stream.local.launch import LaunchError, StageProcess, wait_ready


def _python(name: str, code: str, tmp_path: Path) -> StageProcess:
    return StageProcess(name, [sys.executable, "-c", code], tmp_path / f"{name}.log")


def test_a_child_that_exits_fails_the_wait_at_once_with_its_log(tmp_path: Path) -> None:
    child = _python("early", "print('no config here'); raise SystemExit(3)", tmp_path).start()
    gave_up: list[bool] = []
    started = time.monotonic()
    with pytest.raises(LaunchError, match=r"(?s)early exited with code 3.*no config here"):
        wait_ready(
            child.proc,
            lambda: False,
            name="early",
            what="nothing",
            log_path=child.log_path,
            timeout=30,
            give_up=lambda: gave_up.append(True),
        )
    assert time.monotonic() - started < 10
    assert gave_up == [True]


def test_a_wait_that_runs_out_says_what_it_waited_for(tmp_path: Path) -> None:
    child = _python("slow", "import time; time.sleep(30)", tmp_path).start()
    try:
        with pytest.raises(LaunchError, match="timed out after 0s waiting for the moon"):
            child.wait_until(lambda: False, 0.3, "the moon")
    finally:
        child.kill()
    assert not child.running


def test_stop_is_sigterm_and_returns_the_exit_code(tmp_path: Path) -> None:
    child = _python("polite", "import time; time.sleep(30)", tmp_path).start()
    assert child.stop(10) == -15


def test_a_child_ignoring_sigterm_is_killed_and_the_stop_fails(tmp_path: Path) -> None:
    code = (
        "import signal, time\n"
        "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
        "print('ready', flush=True)\n"
        "time.sleep(60)\n"
    )
    child = _python("stubborn", code, tmp_path).start()
    child.wait_for_log("ready", timeout=20)
    with pytest.raises(LaunchError, match="stubborn ignored SIGTERM"):
        child.stop(0.5)
    assert not child.running
