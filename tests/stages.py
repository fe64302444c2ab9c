"""Run pipeline stages as real processes, the way an operator runs them.

Each stage is ``chargify-stream <stage>`` in a child process with the test's settings in
its environment (:class:`chargify_stream.local.launch.StageProcess`); its output goes to a
log file that is printed when a test fails.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

from chargify_stream.base.settings import Settings
from chargify_stream.local.launch import StageProcess, stage_command


class Stage(StageProcess):
    """One ``chargify-stream`` stage; ``kill()`` is SIGKILL, ``stop()`` SIGTERM."""

    def __init__(self, name: str, settings: Settings, log_dir: Path, *args: str) -> None:
        log_path = log_dir / f"{name}-{int(time.time() * 1000)}.log"
        super().__init__(name, stage_command(name, *args), log_path, env=settings.as_env())
        self.settings = settings
        self.args = args


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
