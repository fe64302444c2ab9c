"""Run a process in the background the one way: a stage, the local Kafka, the local Postgres.

A child runs in its own session (so a signal reaches everything it starts) with its output
appended to a log file. :func:`wait_ready` waits until a check passes, failing at once, with
the end of the log, if the child exits. :func:`terminate` asks it to stop and kills it after
a timeout. :class:`StageProcess` puts these together for a ``chargify-stream <stage>``
process, as the tests, the benchmarks and ``chargify-stream up`` run it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import ClassVar, Self

import httpx

from chargify_stream.base.errors import ServiceError
from chargify_stream.base.settings import Settings

__all__ = [
    "LaunchError",
    "LocalService",
    "StageProcess",
    "http_ok",
    "log_tail",
    "spawn",
    "stage_command",
    "stop_all",
    "terminate",
    "wait_ready",
]

log = logging.getLogger(__name__)


class LaunchError(ServiceError):
    """A child process exited, was not ready in time, or would not stop."""


def spawn(
    argv: Sequence[str],
    log_path: Path,
    *,
    env: Mapping[str, str] | None = None,
    cwd: Path | str | None = None,
    preexec_fn: Callable[[], None] | None = None,
) -> subprocess.Popen[bytes]:
    """Start ``argv`` in a new session, stdout and stderr appended to ``log_path``."""
    with open(log_path, "ab") as logf:  # the child keeps its own copy of the descriptor
        return subprocess.Popen(
            list(argv),
            env=None if env is None else dict(env),
            cwd=cwd,
            stdout=logf,
            stderr=subprocess.STDOUT,
            preexec_fn=preexec_fn,
            start_new_session=True,
        )


def log_tail(path: Path, lines: int = 30) -> str:
    """The last ``lines`` lines of a log file, or ``(no log)``."""
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def wait_ready(
    proc: subprocess.Popen[bytes] | None,
    ready: Callable[[], bool],
    *,
    name: str,
    what: str,
    log_path: Path,
    timeout: float,
    interval: float = 0.1,
    tail_lines: int = 30,
    give_up: Callable[[], None] | None = None,
) -> None:
    """Poll ``ready()`` until it is true; ``LaunchError`` if ``proc`` exits or time runs out
    (after calling ``give_up``, which kills what is left)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            problem = f"{name} exited with code {proc.returncode} while waiting for {what}"
            break
        if ready():
            return
        time.sleep(interval)
    else:
        problem = f"{name}: timed out after {timeout:.0f}s waiting for {what}"
    if give_up is not None:
        give_up()
    raise LaunchError(f"{problem}; last log lines:\n{log_tail(log_path, tail_lines)}")


def http_ok(url: str) -> Callable[[], bool]:
    """A readiness check: ``url`` answers 200."""

    def check() -> bool:
        try:
            return httpx.get(url, timeout=2.0).status_code == 200
        except httpx.HTTPError:
            return False

    return check


def terminate(
    proc: subprocess.Popen[bytes] | None,
    timeout: float,
    *,
    sig: int = signal.SIGTERM,
    whole_group: bool = True,
    before_kill: Callable[[], None] | None = None,
) -> bool:
    """Send ``sig`` (to the process group, or the process alone), SIGKILL the group after
    ``timeout`` seconds; ``timeout`` 0 kills at once. True when it stopped in time."""
    if proc is None or proc.poll() is not None:
        return True
    if timeout > 0:
        with contextlib.suppress(ProcessLookupError):
            if whole_group:
                os.killpg(proc.pid, sig)
            else:
                proc.send_signal(sig)
        try:
            proc.wait(timeout)
            return True
        except subprocess.TimeoutExpired:
            log.warning("pid %s did not stop in %.0fs; killing it", proc.pid, timeout)
            if before_kill is not None:
                before_kill()
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    return timeout <= 0


class LocalService:
    """Wait for, stop, kill and clean up a service run by :func:`spawn` (the local Kafka,
    Postgres).

    The service keeps its child in ``_proc``, its output in ``log_file`` and, when it made
    its data folder itself, the temporary folder in ``_tmp``. ``stop()`` sends
    ``stop_signal`` and kills after a timeout.
    """

    _proc: subprocess.Popen[bytes] | None
    _tmp: tempfile.TemporaryDirectory[str] | None
    service_name: ClassVar[str]  # in errors: "Kafka exited with code 1 while waiting for ..."
    stop_signal: ClassVar[int] = signal.SIGTERM
    stop_whole_group: ClassVar[bool] = True  # False: the signal goes to the main process

    @property
    def log_file(self) -> Path:
        raise NotImplementedError

    def _wait_until(
        self,
        check: Callable[[], bool],
        timeout: float,
        what: str,
        *,
        interval: float = 0.1,
        tail_lines: int = 30,
    ) -> None:
        """:func:`wait_ready` for this service; if it exits or time runs out it is killed,
        and the ``LaunchError`` carries the end of its log."""
        wait_ready(
            self._proc,
            check,
            name=self.service_name,
            what=what,
            log_path=self.log_file,
            timeout=timeout,
            interval=interval,
            tail_lines=tail_lines,
            give_up=self.kill,
        )

    def stop(self, timeout: float = 20.0) -> None:
        """``stop_signal``, then SIGKILL after ``timeout`` seconds."""
        proc, self._proc = self._proc, None
        terminate(proc, timeout, sig=self.stop_signal, whole_group=self.stop_whole_group)

    def kill(self) -> None:
        """SIGKILL at once (the data survives for a restart)."""
        proc, self._proc = self._proc, None
        terminate(proc, 0)

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def cleanup(self) -> None:
        """Stop, and remove the data folder if it is a temporary one."""
        self.stop()
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None


def stage_command(name: str, *args: str) -> list[str]:
    """``chargify-stream NAME ARGS`` with this interpreter."""
    return [sys.executable, "-m", "chargify_stream", name, *args]


class StageProcess:
    """One background process with a log file: ``start``, wait for it, ``stop`` or ``kill``.

    ``stop()`` is SIGTERM (every stage stops gracefully on it); a stage still running after
    the timeout is asked where it is stuck (:meth:`dump_stacks`), killed, and the stop
    raises ``LaunchError`` with the end of its log.
    """

    def __init__(
        self,
        name: str,
        argv: Sequence[str],
        log_path: Path,
        *,
        env: Mapping[str, str] | None = None,
        cwd: Path | str | None = None,
    ) -> None:
        self.name = name
        self.argv = list(argv)
        self.log_path = log_path
        self.env = {**os.environ, **(env or {}), "PYTHONUNBUFFERED": "1"}
        self.cwd = cwd
        self.proc: subprocess.Popen[bytes] | None = None
        self._terminated = False

    @classmethod
    def stage(
        cls,
        name: str,
        settings: Settings | None,
        log_path: Path,
        *args: str,
        env: Mapping[str, str] | None = None,
        cwd: Path | str | None = None,
    ) -> Self:
        """``chargify-stream NAME ARGS`` with ``settings`` (and ``env``) in its environment."""
        extra = {**(settings.as_env() if settings is not None else {}), **(env or {})}
        return cls(name, stage_command(name, *args), log_path, env=extra, cwd=cwd)

    def start(self) -> Self:
        self.proc = spawn(self.argv, self.log_path, env=self.env, cwd=self.cwd)
        self._terminated = False
        return self

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    @property
    def returncode(self) -> int | None:
        """The exit code once the process has ended, else None."""
        return None if self.proc is None else self.proc.poll()

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def wait_until(self, check: Callable[[], bool], timeout: float, what: str) -> None:
        wait_ready(
            self.proc,
            check,
            name=self.name,
            what=what,
            log_path=self.log_path,
            timeout=timeout,
            tail_lines=200,
        )

    def wait_for_log(self, text: str, timeout: float = 60.0) -> None:
        self.wait_until(lambda: text in self.log(), timeout, f"{text!r} in the {self.name} log")

    def wait_http_ready(self, url: str, timeout: float = 30.0) -> None:
        self.wait_until(http_ok(url), timeout, url)

    def start_ready(self, url: str, timeout: float = 60.0) -> Self:
        """Start, and wait until ``url`` answers 200; killed if it does not in time."""
        self.start()
        try:
            self.wait_http_ready(url, timeout)
        except LaunchError:
            self.kill()
            raise
        return self

    def signal(self, sig: int) -> None:
        if self.running:
            assert self.proc is not None
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, sig)
            if sig == signal.SIGTERM:
                self._terminated = True

    def kill(self) -> None:
        terminate(self.proc, 0)

    def stop(self, timeout: float = 20.0) -> int | None:
        """SIGTERM (once), then SIGKILL after ``timeout``; the exit code."""
        if self.proc is None:
            return None
        if not self._terminated:
            self.signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.dump_stacks()
            self.kill()
            raise LaunchError(  # noqa: B904 - the timeout is the error
                f"{self.name} ignored SIGTERM for {timeout:.0f}s; "
                f"last log lines:\n{log_tail(self.log_path, 400)}"
            )

    def dump_stacks(self) -> None:
        """Have a stuck stage print where it is: every thread (SIGQUIT, see cli.main), and
        for the processor every asyncio task too (SIGUSR1, mode's worker)."""
        self.signal(signal.SIGQUIT)
        if self.name == "processor":
            self.signal(signal.SIGUSR1)
        time.sleep(2.0)


def stop_all(processes: Sequence[StageProcess], timeout: float = 20.0) -> list[str]:
    """SIGTERM every process at once, then wait for each; the errors of those that would
    not stop (they are killed)."""
    for process in processes:
        process.signal(signal.SIGTERM)
    errors = []
    for process in processes:
        try:
            process.stop(timeout)
        except LaunchError as exc:
            errors.append(str(exc))
    return errors
