"""Run pipeline stages as real processes, the way an operator runs them.

Each stage is ``chargify-stream <stage>`` in a child process with the test's settings in
its environment; its output goes to a log file that is printed when a test fails.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import httpx

from chargify_stream.settings import Settings


class Stage:
    """One running ``chargify-stream`` stage; ``kill()`` is SIGKILL, ``stop()`` SIGTERM."""

    def __init__(self, name: str, settings: Settings, log_dir: Path, *args: str) -> None:
        self.name = name
        self.settings = settings
        self.args = args
        self.log_path = log_dir / f"{name}-{int(time.time() * 1000)}.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> Stage:
        env = {**os.environ, **self.settings.as_env(), "PYTHONUNBUFFERED": "1"}
        logf = open(self.log_path, "ab")  # noqa: SIM115 - owned by the child
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "chargify_stream", self.name, *self.args],
            env=env,
            stdout=logf,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        logf.close()
        return self

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def wait_for_log(self, text: str, timeout: float = 60.0) -> None:
        self.wait_until(lambda: text in self.log(), timeout, f"{text!r} in the {self.name} log")

    def wait_until(self, check: Callable[[], bool], timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if check():
                return
            if self.proc is not None and self.proc.poll() is not None:
                raise AssertionError(f"{self.name} exited ({self.proc.returncode}):\n{self.log()}")
            time.sleep(0.1)
        raise AssertionError(
            f"timed out waiting for {what}; {self.name} log:\n{self.log()[-4000:]}"
        )

    def wait_http_ready(self, url: str, timeout: float = 30.0) -> None:
        def ready() -> bool:
            try:
                return httpx.get(url, timeout=1.0).status_code == 200
            except httpx.HTTPError:
                return False

        self.wait_until(ready, timeout, url)

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def signal(self, sig: int) -> None:
        if self.running:
            assert self.proc is not None
            os.killpg(self.proc.pid, sig)

    def kill(self) -> None:
        self.signal(signal.SIGKILL)
        if self.proc is not None:
            self.proc.wait()

    def stop(self, timeout: float = 20.0) -> int | None:
        if not self.running:
            return self.proc.returncode if self.proc else None
        assert self.proc is not None
        self.signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.dump_stacks()
            self.kill()
            raise AssertionError(  # noqa: B904 - the timeout is the error
                f"{self.name} ignored SIGTERM for {timeout}s:\n{self.log()[-30000:]}"
            )

    def dump_stacks(self) -> None:
        """Have a stuck stage print where it is: every thread (SIGQUIT, see cli.main), and
        for the processor every asyncio task too (SIGUSR1, mode's worker)."""
        self.signal(signal.SIGQUIT)
        if self.name == "processor":
            self.signal(signal.SIGUSR1)
        time.sleep(2.0)


def run_cli(settings: Settings, *args: str) -> subprocess.CompletedProcess[str]:
    """``chargify-stream ARGS`` with the test's settings, as an operator runs it."""
    env = {**os.environ, **settings.as_env()}
    return subprocess.run(
        [sys.executable, "-m", "chargify_stream", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
