"""Load from wrk: the binary (installed if missing) and one timed run of ``post.lua``.

Used by ``bench/gateway/run.py`` and ``bench/e2e/run.py``.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent


def ensure_wrk() -> str:
    """The wrk binary, installed from Debian's packages if missing."""
    found = shutil.which("wrk")
    if found:
        return found
    sudo = [] if os.geteuid() == 0 else ["sudo"]
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    install = [*sudo, "apt-get", "install", "-y", "-qq", "wrk"]
    if subprocess.run(install, env=env, check=False).returncode != 0:
        subprocess.run([*sudo, "apt-get", "update", "-qq"], env=env, check=True)
        subprocess.run(install, env=env, check=True)
    found = shutil.which("wrk")
    if not found:
        sys.exit("wrk is still missing after apt-get install wrk")
    return found


def wrk(
    binary: str, url: str, bodies: Path, *, seconds: int, connections: int, rate: int = 0
) -> dict[str, Any]:
    """Run wrk once; its ``done()`` prints one JSON line of counts and latencies (µs)."""
    env = {k: v for k, v in os.environ.items() if k != "BENCH_RATE"}
    if rate:
        env["BENCH_RATE"] = str(rate)
    cmd = [
        binary,
        "-t1",
        f"-c{connections}",
        f"-d{seconds}s",
        "--timeout",
        "10s",
        "-s",
        str(HERE / "post.lua"),
        url,
        "--",
        str(bodies),
    ]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True).stdout
    result: dict[str, Any] = json.loads(out.strip().splitlines()[-1])
    seconds_run = result["duration_us"] / 1e6
    errors = sum(result[k] for k in ("connect_errors", "read_errors", "write_errors", "timeouts"))
    result["ok"] = result["requests"] - result["status_errors"]
    result["errors"] = errors
    result["ok_per_s"] = result["ok"] / seconds_run
    return result
