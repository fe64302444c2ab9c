"""Benchmark the gateway: signed, real-size Chargify bodies against a real broker.

    .venv/bin/python bench/gateway/run.py [--server uvicorn|granian] [--rounds 2]

Starts a local Kafka broker (the same launcher as the tests), then, in alternating rounds,
two servers of the same app on the same machine: the gateway as ``chargify-stream
gateway`` runs it (verify, frame, publish, wait for ``acks=all``), and the baseline, the
same app whose sink acknowledges at once (it still verifies and frames, but publishes
nothing). Each is driven by wrk (installed from Debian's packages if missing) with
``post.lua``: the real RAW-FORM samples from the shared folder, each under many webhook
ids, signed with the benchmark key (read at run time, never copied into the repo).

Two scenarios per server: saturation (64 connections sending back to back) and a fixed
rate of 1,000 requests/s (a wrk2-style schedule in ``post.lua``). For the publishing
server, every 200 is checked against the raw topic's end offset: accepted means durable.

The machine is shared and busy, so absolute numbers move from run to run; the ratio to
the baseline, measured in the same rounds, is the figure to compare. Prints one line per
scenario and writes every measurement to ``bench/results/gateway-<time>.json``.
"""

from __future__ import annotations

import argparse
import hashlib
import hmac
import json
import os
import re
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
from loadgen import ensure_wrk, wrk  # bench/gateway/, the script's folder

from chargify_stream.base.kafka_admin import ensure_topics
from chargify_stream.local.kafka import LocalKafka
from chargify_stream.local.launch import StageProcess
from chargify_stream.local.ports import free_port

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
KEY = "bench-shared-key"
PARTITIONS = 3
RAW = "chargify.webhooks.raw"


def samples_dir() -> Path:
    configured = os.environ.get("CHARGIFY_SAMPLES_DIR")
    return Path(configured) if configured else REPO.parent / "shared" / "chargify" / "samples"


def write_bodies(path: Path, per_sample: int) -> tuple[int, float]:
    """Write ``signature<TAB>body`` lines: every RAW-FORM sample under fresh webhook ids.

    Returns the number of bodies and their mean size in bytes.
    """
    folder = samples_dir()
    raw = [
        p.read_bytes().rstrip(b"\r\n")
        for p in sorted(folder.glob("*.txt"))
        if p.read_bytes()[:3] == b"id="
    ]
    if not raw:
        sys.exit(f"no RAW-FORM samples in {folder}; set CHARGIFY_SAMPLES_DIR")
    sizes = []
    webhook_id = 5_000_000_000
    with path.open("wb") as out:
        for _ in range(per_sample):
            for body in raw:
                webhook_id += 1
                body = re.sub(rb"^id=\d+", b"id=%d" % webhook_id, body)
                signature = hmac.new(KEY.encode(), body, hashlib.sha256).hexdigest()
                out.write(signature.encode() + b"\t" + body + b"\n")
                sizes.append(len(body))
    return len(sizes), statistics.fmean(sizes)


class Server(StageProcess):
    """One gateway process (``serve.py``) on a free port, ready when constructed."""

    def __init__(self, *, sink: str, server: str, kafka: str, prefix: str, log: Path) -> None:
        self.port = free_port()
        self.sink = sink
        env = {
            "KAFKA_BOOTSTRAP_SERVERS": kafka,
            "CHARGIFY_SHARED_KEYS": KEY,
            "GATEWAY_PORT": str(self.port),
            "KAFKA_TOPIC_PREFIX": prefix,
            "TOPIC_PARTITIONS": str(PARTITIONS),
            "LOG_LEVEL": "WARNING",
            "PYTHONPATH": str(REPO),
        }
        cmd = [sys.executable, str(HERE / "serve.py"), "--sink", sink, "--server", server]
        super().__init__(f"{sink} server", cmd, log, env=env)
        self.url = f"http://127.0.0.1:{self.port}"
        self.start_ready(f"{self.url}/readyz")

    def accepted(self) -> int:
        """Requests the server answered 200, from its own metrics."""
        for line in httpx.get(f"{self.url}/metrics", timeout=5).text.splitlines():
            if line.startswith('gateway_requests_total{status="200"}'):
                return int(float(line.split()[-1]))
        return 0


def end_offset(kafka: str, topic: str) -> int:
    from confluent_kafka import Consumer, TopicPartition

    consumer = Consumer({"bootstrap.servers": kafka, "group.id": "bench-watermarks"})
    try:
        return sum(
            consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=10)[1]
            for p in range(PARTITIONS)
        )
    finally:
        consumer.close()


def fmt(r: dict[str, Any]) -> str:
    return f"{r['ok_per_s']:,.0f}/s p50 {r['p50_us'] / 1000:.1f} ms p99 {r['p99_us'] / 1000:.1f} ms"


def measure(
    args: argparse.Namespace,
    binary: str,
    bodies: Path,
    work: Path,
    kafka: LocalKafka,
    prefix: str,
    sink: str,
    server_name: str,
) -> dict[str, dict[str, Any]]:
    """Start one server, warm it up, measure both scenarios, stop it."""
    server = Server(
        sink=sink,
        server=server_name,
        kafka=kafka.bootstrap_servers,
        prefix=prefix,
        log=work / f"{server_name}-{sink}.log",
    )
    topic = prefix + RAW
    try:
        # Warm up: connections, the producer's metadata and batches, caches.
        wrk(binary, server.url, bodies, seconds=3, connections=args.connections)
        before = end_offset(kafka.bootstrap_servers, topic)
        accepted_before = server.accepted()
        sat = wrk(binary, server.url, bodies, seconds=args.seconds, connections=args.connections)
        fixed = wrk(
            binary,
            server.url,
            bodies,
            seconds=args.seconds,
            connections=args.rate_connections,
            rate=args.rate,
        )
        accepted = server.accepted() - accepted_before
        written = end_offset(kafka.bootstrap_servers, topic) - before
    finally:
        server.stop()
    if sink == "kafka" and written < accepted:
        sys.exit(f"only {written} records on the topic for {accepted} accepted")
    results = {"saturation": sat, "rate": fixed}
    for name, r in results.items():
        if r["errors"] or r["status_errors"]:
            print(f"warning: {server_name} {sink} {name}: {r}", file=sys.stderr)
    durable = f"; {written} records on the topic for {accepted} 200s" if sink == "kafka" else ""
    print(
        f"{server_name} {'publish' if sink == 'kafka' else 'no-publish'}: "
        f"saturation {fmt(sat)}; {args.rate}/s {fmt(fixed)}{durable}",
        flush=True,
    )
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description="Benchmark the gateway against a real broker")
    parser.add_argument(
        "--server",
        choices=["uvicorn", "granian"],
        action="append",
        help="HTTP server (default uvicorn, what the gateway runs); repeat to compare",
    )
    parser.add_argument("--rounds", type=int, default=2, help="alternating rounds per server")
    parser.add_argument("--seconds", type=int, default=15, help="length of each measurement")
    parser.add_argument("--connections", type=int, default=64, help="at saturation")
    parser.add_argument("--rate", type=int, default=1000, help="requests/s of the fixed rate")
    parser.add_argument("--rate-connections", type=int, default=50)
    args = parser.parse_args()
    servers: list[str] = args.server or ["uvicorn"]

    binary = ensure_wrk()
    work = Path(tempfile.mkdtemp(prefix="bench-gateway-"))
    bodies = work / "bodies.txt"
    count, mean_size = write_bodies(bodies, per_sample=200)
    results_dir = REPO / "bench" / "results"
    results_dir.mkdir(parents=True, exist_ok=True)

    kafka = LocalKafka(data_dir=work / "kafka")
    kafka.start()
    runs: list[dict[str, Any]] = []
    try:
        prefix = f"bench{int(time.time())}."
        ensure_topics(kafka.bootstrap_servers, [prefix + RAW], partitions=PARTITIONS)
        # Alternate servers and sinks within each round, so that the other load on the
        # machine falls on all of them alike.
        for round_ in range(1, args.rounds + 1):
            for server_name in servers:
                for sink in ("none", "kafka"):
                    for scenario, r in measure(
                        args, binary, bodies, work, kafka, prefix, sink, server_name
                    ).items():
                        runs.append(
                            {
                                "round": round_,
                                "server": server_name,
                                "sink": sink,
                                "scenario": scenario,
                                **r,
                            }
                        )
    finally:
        kafka.cleanup()

    summary: dict[str, Any] = {"bodies": count, "mean_body": mean_size}
    for server_name in servers:
        for scenario, label in (
            ("saturation", f"saturation ({args.connections} connections)"),
            ("rate", f"fixed {args.rate}/s ({args.rate_connections} connections)"),
        ):
            pub, base = (
                {
                    k: statistics.median(
                        r[k]
                        for r in runs
                        if (r["server"], r["sink"], r["scenario"]) == (server_name, sink, scenario)
                    )
                    for k in ("ok_per_s", "p50_us", "p99_us")
                }
                for sink in ("kafka", "none")
            )
            summary[f"{server_name} {scenario}"] = {"publish": pub, "baseline": base}
            print(
                f"gateway {server_name} {label}: publish {fmt(pub)} | no-publish {fmt(base)} | "
                f"ratio throughput {pub['ok_per_s'] / base['ok_per_s']:.2f}x, "
                f"p50 {pub['p50_us'] / base['p50_us']:.2f}x, "
                f"p99 {pub['p99_us'] / base['p99_us']:.2f}x"
            )
    out = results_dir / f"gateway-{time.strftime('%Y%m%dT%H%M%S')}.json"
    out.write_text(json.dumps({"summary": summary, "runs": runs}, indent=2))
    print(f"({count} bodies, mean {mean_size:,.0f} bytes; details in {out.relative_to(REPO)})")
    shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
