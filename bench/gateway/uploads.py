"""The gateway's peak memory under a crowd of large uploads it must refuse.

    .venv/bin/python bench/gateway/uploads.py [--count 1000] [--size 1048576]
        [--scenario unsigned --scenario bad-signature] [--kafka HOST:PORT]

Starts a local Kafka broker (the tests' launcher; or uses ``--kafka``) and, per scenario,
a fresh ``chargify-stream gateway`` process with its default settings. Then ``--count``
clients at once each send a body of ``--size`` bytes with its ``Content-Length``, the
whole body whatever the gateway answers, and read the answer:

- ``unsigned``: no signature at all (refused 401 before the body is read, which the
  connection then discards);
- ``bad-signature``: a signature header that does not match (the body must be read before
  that can be known: bounded by ``GATEWAY_MAX_INFLIGHT_BYTES``, 503 beyond it).

The gateway's resident memory is read from ``/proc/PID/status`` (Linux): at rest before
the load, its peak (``VmHWM``, the kernel's high-water mark) and after. Prints one line
per scenario and writes them to ``bench/results/uploads-<time>.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

from chargify_stream.base.kafka_admin import ensure_topics
from chargify_stream.local.kafka import LocalKafka
from chargify_stream.local.launch import StageProcess, stage_command
from chargify_stream.local.ports import free_port

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
RAW = "chargify.webhooks.raw"
SIGNATURE = "X-Chargify-Webhook-Signature-Hmac-Sha-256"
PIECE = 64 * 1024


def memory(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM of ``pid``, in bytes."""
    out: dict[str, int] = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        name, _, value = line.partition(":")
        if name in ("VmRSS", "VmHWM"):
            out[name] = int(value.split()[0]) * 1024
    return out


class Gateway(StageProcess):
    """``chargify-stream gateway`` on a free port, as an operator runs it; ready when built."""

    def __init__(self, kafka: str, prefix: str, log: Path) -> None:
        self.port = free_port()
        env = {
            "KAFKA_BOOTSTRAP_SERVERS": kafka,
            "CHARGIFY_SHARED_KEYS": "bench-shared-key",
            "GATEWAY_PORT": str(self.port),
            "KAFKA_TOPIC_PREFIX": prefix,
            "LOG_LEVEL": "ERROR",
            "PYTHONPATH": str(REPO),
        }
        super().__init__("gateway", stage_command("gateway"), log, env=env)
        self.start_ready(f"http://127.0.0.1:{self.port}/readyz")


async def upload(port: int, head: bytes, body: bytes) -> str:
    """Send one request with its whole body, then read the answer's status."""
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
    except OSError as exc:
        return f"connect:{type(exc).__name__}"
    try:
        writer.write(head)
        for offset in range(0, len(body), PIECE):
            writer.write(body[offset : offset + PIECE])
            await writer.drain()
        line = await reader.readline()
        return line.split()[1].decode() if line.startswith(b"HTTP/1.1 ") else "no answer"
    except OSError as exc:
        return type(exc).__name__
    finally:
        writer.close()


async def crowd(port: int, count: int, size: int, scenario: str) -> Counter[str]:
    body = b"id=1&event=payment_success&memo=" + b"a" * size
    body = body[:size]
    head = (
        b"POST /webhooks/chargify HTTP/1.1\r\nHost: bench\r\n"
        b"Content-Type: application/x-www-form-urlencoded\r\n"
        + f"Content-Length: {len(body)}\r\n".encode()
        + (f"{SIGNATURE}: {'0' * 64}\r\n".encode() if scenario == "bad-signature" else b"")
        + b"\r\n"
    )
    async with asyncio.timeout(300):
        statuses = await asyncio.gather(*(upload(port, head, body) for _ in range(count)))
    return Counter(statuses)


def run(kafka: str, work: Path, scenario: str, count: int, size: int) -> dict[str, Any]:
    prefix = f"up{time.monotonic_ns()}."
    ensure_topics(kafka, [prefix + RAW], partitions=3)
    gateway = Gateway(kafka, prefix, work / f"gateway-{scenario}.log")
    try:
        pid = gateway.proc.pid
        time.sleep(1.0)
        at_rest = memory(pid)["VmRSS"]
        started = time.monotonic()
        statuses = asyncio.run(crowd(gateway.port, count, size, scenario))
        took = time.monotonic() - started
        time.sleep(1.0)
        mem = memory(pid)
    finally:
        gateway.stop()
    return {
        "scenario": scenario,
        "count": count,
        "size": size,
        "statuses": dict(statuses),
        "seconds": round(took, 2),
        "rss_at_rest": at_rest,
        "rss_peak": mem["VmHWM"],
        "rss_after": mem["VmRSS"],
    }


def fmt(r: dict[str, Any]) -> str:
    mb = 1_000_000
    return (
        f"{r['scenario']}: {r['count']} x {r['size']:,} B at once in {r['seconds']} s, "
        f"answers {r['statuses']}; gateway RSS at rest {r['rss_at_rest'] / mb:.0f} MB, "
        f"peak {r['rss_peak'] / mb:.0f} MB, after {r['rss_after'] / mb:.0f} MB"
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int, default=1000)
    parser.add_argument("--size", type=int, default=1024 * 1024)
    parser.add_argument(
        "--scenario", action="append", choices=["unsigned", "bad-signature"], default=None
    )
    parser.add_argument("--kafka", help="use this broker instead of starting one")
    args = parser.parse_args()
    scenarios = args.scenario or ["unsigned", "bad-signature"]
    results: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="bench-uploads-") as tmp:
        work = Path(tmp)
        kafka: LocalKafka | None = None
        bootstrap = args.kafka
        if bootstrap is None:
            kafka = LocalKafka(data_dir=work / "kafka")
            kafka.start()
            bootstrap = kafka.bootstrap_servers
        try:
            for scenario in scenarios:
                result = run(bootstrap, work, scenario, args.count, args.size)
                results.append(result)
                print(fmt(result), flush=True)
        finally:
            if kafka is not None:
                kafka.stop()
    out = REPO / "bench" / "results" / f"uploads-{time.strftime('%Y%m%dT%H%M%S')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
