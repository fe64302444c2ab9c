"""Benchmark one processor worker: exactly once against at least once, in the same run.

    .venv/bin/python bench/processor/run.py [--events 60000] [--rounds 3]
        [--profile FILE [--profiler py-spy|cprofile|pyinstrument]]

Starts a local Kafka broker (the tests' launcher, a temporary folder), writes the
workload (``bench/processor/workload.py``: real-size bodies, mean about 3.5 kB, the
realistic mix of events, 4 % duplicates, 5 % ignored, 1 % dead letters) to a 3-partition
raw topic as the gateway writes it (lz4, keyed by subscription id, its headers). Then, in
rounds, each over the whole pre-loaded topic with a fresh consumer group:

- **bare consumer**: a confluent-kafka consumer that reads every record and touches its
  value and headers, timed from its first record to its last: reading the topic and
  nothing else, the ceiling for any consumer in Python;
- **exactly once**: ``chargify-stream processor`` as an operator runs it (a child process,
  fresh ``PROCESSOR_APP_ID`` so fresh state, fresh output topics): one Kafka transaction
  per batch;
- **at least once**: the same worker with the same pipeline, but outputs sent with a plain
  idempotent producer and the offsets committed after every output was acknowledged
  (``bench/processor/at_least_once.py``): what the transactions cost.

The two processor runs alternate which goes first. Each is timed from its first output
record to its last (their producer timestamps), so process start and group join are left
out; the round waits until the worker has committed the whole raw topic, then checks what
a read_committed reader sees: exactly the expected number of records on each output
topic (every emit once, duplicates dropped, nothing lost).

Prints one line (medians of the rounds; the ratio exactly once / at least once) and
writes the measurements to ``bench/results/processor-<time>.json``. ``--profile FILE``
runs the exactly-once worker of the last round under a profiler: ``py-spy`` (sampling from
outside the process, collapsed stacks), ``cprofile`` (a stats file) or ``pyinstrument``
(a text report). py-spy and pyinstrument are not dependencies: ``.venv/bin/pip install
py-spy`` first.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

from confluent_kafka import Consumer, Producer, TopicPartition

sys.path.insert(0, str(Path(__file__).resolve().parent))

from workload import Workload, make_workload

from chargify_stream.base.kafka_admin import ensure_topics
from chargify_stream.base.settings import Settings, load_settings
from chargify_stream.local.kafka import LocalKafka
from chargify_stream.local.ports import free_port

HERE = Path(__file__).resolve().parent
RESULTS = HERE.parent / "results"
PARTITIONS = 3
OUTPUTS = ("transactions", "subscriptions", "deadletter")
# Per mode, the worker's CPU seconds (user + system, all its threads) per round.
cpu_seconds: dict[str, list[float]] = {}


def preload(bootstrap: str, topic: str, work: Workload) -> None:
    producer = Producer(
        {
            "bootstrap.servers": bootstrap,
            "linger.ms": 20,
            "acks": "all",
            "enable.idempotence": True,
            "compression.type": "lz4",  # as the gateway writes it
            "queue.buffering.max.messages": 1_000_000,
            "queue.buffering.max.kbytes": 2_000_000,
        }
    )
    for key, value, headers in work.records:
        producer.produce(topic, key=key, value=value, headers=headers)
        producer.poll(0)
    assert producer.flush(120) == 0, "preload not acknowledged"


def bare_consumer(bootstrap: str, topic: str, count: int) -> float:
    """Seconds from the first record to the last, reading all ``count`` records."""
    consumer = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": f"bench-bare-{uuid.uuid4().hex}",
            "auto.offset.reset": "earliest",
            "enable.auto.commit": False,
        }
    )
    consumer.subscribe([topic])
    seen = 0
    total_bytes = 0
    first = 0.0
    deadline = time.monotonic() + 300
    try:
        while seen < count and time.monotonic() < deadline:
            for msg in consumer.consume(1000, 0.5):
                if msg.error():
                    continue
                if not seen:
                    first = time.perf_counter()
                seen += 1
                total_bytes += len(msg.value()) + len(msg.headers() or ())
        last = time.perf_counter()
    finally:
        consumer.close()
    assert seen == count, f"bare consumer read {seen} of {count}"
    assert total_bytes > 0
    return last - first


def committed(settings: Settings) -> int:
    group = settings.processor_app_id
    consumer = Consumer({"bootstrap.servers": settings.kafka_bootstrap_servers, "group.id": group})
    try:
        tps = [TopicPartition(settings.topic("raw"), p) for p in range(PARTITIONS)]
        return sum(max(tp.offset, 0) for tp in consumer.committed(tps, timeout=10))
    except Exception:
        return -1
    finally:
        consumer.close()


def output_times(settings: Settings, expected: int) -> tuple[dict[str, int], float, float]:
    """Records per output topic (as a read_committed reader sees them), and the first
    and last producer timestamp (s)."""
    consumer = Consumer(
        {
            "bootstrap.servers": settings.kafka_bootstrap_servers,
            "group.id": f"bench-read-{uuid.uuid4().hex}",
            "auto.offset.reset": "earliest",
            "enable.auto.commit": False,
        }
    )
    counts = dict.fromkeys(OUTPUTS, 0)
    names = {settings.topic(n): n for n in OUTPUTS}
    consumer.subscribe(list(names))
    first, last = float("inf"), 0.0
    read = 0
    # Past the expected count, read on a little: a duplicate would show.
    deadline = time.monotonic() + 120
    settle: float | None = None
    try:
        while time.monotonic() < deadline and (settle is None or time.monotonic() < settle):
            if settle is None and read >= expected:
                settle = time.monotonic() + 2.0
            for msg in consumer.consume(1000, 0.5):
                if msg.error():
                    continue
                read += 1
                counts[names[msg.topic()]] += 1
                stamp = msg.timestamp()[1] / 1000
                first, last = min(first, stamp), max(last, stamp)
    finally:
        consumer.close()
    return counts, first, last


def processor_round(
    base: Settings, n: int, work: Workload, mode: str, profile: Path | None, profiler: str
) -> float:
    tag = uuid.uuid4().hex[:8]
    settings = load_settings(
        **{
            **base.model_dump(),
            "processor_app_id": f"bench-processor-{tag}",
            "topic_transactions": f"bench-{tag}.transactions",
            "topic_subscriptions": f"bench-{tag}.subscriptions",
            "topic_deadletter": f"bench-{tag}.deadletter",
            "processor_web_port": free_port(),
            "processor_data_dir": f"/tmp/bench-processor-{tag}",
        }
    )
    ensure_topics(settings.kafka_bootstrap_servers, settings.all_topics, partitions=PARTITIONS)
    env = {**os.environ, **settings.as_env(), "PYTHONUNBUFFERED": "1", "LOG_LEVEL": "WARNING"}
    cmd = [sys.executable, "-m", "chargify_stream", "processor"]
    if mode == "at-least-once":
        cmd = [sys.executable, str(HERE / "at_least_once.py")]
    if profile is not None and profiler == "cprofile":
        cmd = [sys.executable, "-m", "cProfile", "-o", str(profile), *cmd[1:]]
    elif profile is not None and profiler == "pyinstrument":
        cmd = [sys.executable, "-m", "pyinstrument", "-r", "text", "-o", str(profile), *cmd[1:]]
    log = open(RESULTS / f"processor-worker-{tag}.log", "wb")  # noqa: SIM115
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
    spy = None
    if profile is not None and profiler == "py-spy":
        spy = subprocess.Popen(
            [str(Path(sys.executable).with_name("py-spy")), "record", "--pid", str(proc.pid),
             "--format", "raw", "--rate", "250", "--output", str(profile), "--nonblocking"],
            stdout=subprocess.DEVNULL,
        )  # fmt: skip
    try:
        deadline = time.monotonic() + 600
        while committed(settings) < n:
            if proc.poll() is not None:
                raise SystemExit(f"the processor exited ({proc.returncode}); see {log.name}")
            if time.monotonic() > deadline:
                raise SystemExit("the processor did not drain the raw topic within 600 s")
            time.sleep(0.5)
    finally:
        if spy is not None:
            spy.send_signal(signal.SIGINT)
            spy.wait(60)
        proc.terminate()
        _, _, usage = os.wait4(proc.pid, 0)  # the worker's CPU time, start-up included
        log.close()
    cpu_seconds.setdefault(mode, []).append(usage.ru_utime + usage.ru_stime)
    counts, first, last = output_times(settings, sum(work.expected[t] for t in OUTPUTS))
    assert counts == {t: work.expected[t] for t in OUTPUTS}, (counts, dict(work.expected))
    return last - first


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--events", type=int, default=60_000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--profile", type=Path, help="profile the last round's worker")
    parser.add_argument(
        "--profiler", choices=("py-spy", "cprofile", "pyinstrument"), default="py-spy"
    )
    args = parser.parse_args()
    if args.profile is not None and args.profiler != "cprofile":
        tool = Path(sys.executable).with_name(args.profiler)
        if not tool.exists():
            parser.error(
                f"--profiler {args.profiler} needs {tool} (not a project dependency): "
                f".venv/bin/pip install {args.profiler}, or use --profiler cprofile"
            )
    RESULTS.mkdir(exist_ok=True)

    work = make_workload(args.events)
    kafka = LocalKafka()
    kafka.start()
    seconds: dict[str, list[float]] = {"bare": [], "exactly-once": [], "at-least-once": []}
    try:
        base = load_settings(
            kafka_bootstrap_servers=kafka.bootstrap_servers,
            topic_raw=f"bench-{uuid.uuid4().hex[:8]}.webhooks.raw",
            topic_partitions=PARTITIONS,
            processor_dedup_window_s=3600,
        )
        raw = base.topic("raw")
        ensure_topics(base.kafka_bootstrap_servers, [raw], partitions=PARTITIONS)
        preload(base.kafka_bootstrap_servers, raw, work)
        for round_ in range(args.rounds):
            seconds["bare"].append(bare_consumer(base.kafka_bootstrap_servers, raw, args.events))
            modes = ["exactly-once", "at-least-once"]
            if round_ % 2:
                modes.reverse()
            last = round_ == args.rounds - 1
            for mode in modes:
                profile = args.profile if last and mode == "exactly-once" else None
                seconds[mode].append(
                    processor_round(base, args.events, work, mode, profile, args.profiler)
                )
            print(
                f"  round {round_ + 1}: bare {args.events / seconds['bare'][-1]:,.0f}/s, "
                f"exactly once {args.events / seconds['exactly-once'][-1]:,.0f}/s, "
                f"at least once {args.events / seconds['at-least-once'][-1]:,.0f}/s "
                f"({' first, '.join(modes)} second)",
                file=sys.stderr,
            )
    finally:
        kafka.cleanup()
    rate = {name: args.events / statistics.median(s) for name, s in seconds.items()}
    ratio = rate["exactly-once"] / rate["at-least-once"]
    result: dict[str, Any] = {
        "events": args.events,
        "partitions": PARTITIONS,
        "mean_body_bytes": round(work.mean_body_bytes),
        "mix": dict(work.kinds),
        "expected_outputs": dict(work.expected),
        "seconds": seconds,
        "events_per_s": rate,
        "worker_cpu_seconds": cpu_seconds,
        "ratio_exactly_once_to_at_least_once": ratio,
        "ratio_to_bare": rate["exactly-once"] / rate["bare"],
        "load_average": list(os.getloadavg()),
    }
    out = RESULTS / f"processor-{time.strftime('%Y%m%dT%H%M%S')}.json"
    out.write_text(json.dumps(result, indent=2))
    print(
        f"processor exactly once: {rate['exactly-once']:,.0f} events/s, at least once: "
        f"{rate['at-least-once']:,.0f} events/s, ratio {ratio:.2f}; bare consumer "
        f"{rate['bare']:,.0f} events/s; worker CPU per 1,000 events (start-up included): "
        + ", ".join(
            f"{mode} {1000 * statistics.median(c) / args.events:.2f} s"
            for mode, c in sorted(cpu_seconds.items())
        )
        + f" ({args.events} events, mean body "
        f"{work.mean_body_bytes:,.0f} B, {args.rounds} rounds, load {os.getloadavg()[0]:.1f})"
    )


if __name__ == "__main__":
    main()
