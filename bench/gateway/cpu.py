"""The gateway's CPU time per request, to compare two trees of the code on a busy machine.

    .venv/bin/python bench/gateway/cpu.py [--tree NAME=PATH ...] [--rounds 3]

Throughput on a shared two-core machine moves with everyone else's load; the CPU time
the gateway process spends per request moves much less. For each tree (default: this
one; ``--tree base=/path/to/another/checkout`` adds one, e.g. a ``git worktree`` of
main), in alternating rounds: serve that tree's app with the no-publish sink
(``serve.py --sink none``: no broker needed), warm up for 2 s, then drive it with wrk
(64 connections, ``post.lua``, the run.py bodies) for 8 s and divide the process's
user + system CPU time by the requests it answered 200. Prints one line per run.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from chargify_stream.local.ports import free_port

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import run as gateway_bench  # noqa: E402 - the sibling benchmark's bodies and helpers

TICKS_PER_S = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS_PER_S


def accepted(url: str) -> float:
    for line in httpx.get(f"{url}/metrics", timeout=5).text.splitlines():
        if line.startswith('gateway_requests_total{status="200"}'):
            return float(line.split()[-1])
    return 0.0


def measure(wrk: str, tree: Path, bodies: Path) -> tuple[float, int]:
    """CPU microseconds per accepted request, and the requests, for one server of ``tree``."""
    port = free_port()
    env = {
        **os.environ,
        "CHARGIFY_SHARED_KEYS": gateway_bench.KEY,
        "GATEWAY_PORT": str(port),
        "LOG_LEVEL": "WARNING",
        "PYTHONPATH": str(tree),
    }
    proc = subprocess.Popen(
        [sys.executable, str(tree / "bench/gateway/serve.py"), "--sink", "none"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{url}/readyz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.1)
        lua = str(HERE / "post.lua")

        def drive(seconds: int) -> None:
            cmd = [wrk, "-t1", "-c64", f"-d{seconds}s", "-s", lua, url, "--", str(bodies)]
            subprocess.run(cmd, capture_output=True, check=True)

        drive(2)
        cpu, done = cpu_seconds(proc.pid), accepted(url)
        drive(8)
        cpu, done = cpu_seconds(proc.pid) - cpu, accepted(url) - done
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    return cpu / done * 1e6, int(done)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tree", action="append", default=[], help="NAME=PATH")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    trees = [("this", HERE.parent.parent)]
    trees += [(t.split("=", 1)[0], Path(t.split("=", 1)[1]).resolve()) for t in args.tree]
    wrk = gateway_bench.ensure_wrk()
    with tempfile.TemporaryDirectory(prefix="bench-cpu-") as tmp:
        bodies = Path(tmp) / "bodies.txt"
        gateway_bench.write_bodies(bodies, 200)
        for _ in range(args.rounds):
            for name, tree in trees:
                us, done = measure(wrk, tree, bodies)
                print(f"{name}: {us:.0f} us of CPU per request ({done:,} requests)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
