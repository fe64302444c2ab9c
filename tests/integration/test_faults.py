"""Nothing lost, nothing doubled: the pipeline under killed processes and services.

Each test runs the three stages as separate processes, sends a stream of signed payment
webhooks while something is killed, and then checks Postgres holds every transaction
that was answered 200 exactly once. A webhook answered with anything else is retried, as
Chargify retries.
"""

from __future__ import annotations

import signal
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from chargify_stream.base.settings import Settings
from chargify_stream.sink.admin import add_customer, add_partner, connect
from tests.builders import build_body
from tests.kafka_tools import transaction_ids
from tests.pipeline import Pipeline
from tests.services import KafkaService, PostgresService

pytestmark = pytest.mark.integration

FIRST_TXN = 8_000_000_001


def payments(count: int, *, start: int = FIRST_TXN, customers: int = 4) -> list[bytes]:
    """``count`` payment webhooks over several subscriptions (so several partitions)."""
    return [
        build_body(
            "payment_success",
            webhook_id=start + i,
            transaction_id=start + i,
            subscription_id=9_000 + i % 7,
            reference=f"cust-{i % customers}",
            amount_cents=100 + i,
        )
        for i in range(count)
    ]


def seed(settings: Settings, customers: int = 4) -> None:
    with connect(settings) as conn:
        add_partner(conn, "p1", None)
        for i in range(customers):
            add_customer(conn, f"cust-{i}", partner="p1")


def send_all(pipeline: Pipeline, bodies: list[bytes], statuses: list[int]) -> None:
    for body in bodies:
        statuses.append(pipeline.post(body))


def assert_exactly_once(pipeline: Pipeline, count: int, *, timeout: float = 90.0) -> None:
    expected = [(count, count, sum(100 + i for i in range(count)))]
    pipeline.wait_for(
        "select count(*), count(distinct transaction_id), sum(amount_cents)::bigint"
        " from transactions",
        expected,
        timeout=timeout,
    )


@pytest.fixture
def make_pipeline(
    stages: Callable[..., Any],
) -> Iterator[Callable[..., Pipeline]]:
    made: list[Pipeline] = []

    def make(settings: Settings, **kw: Any) -> Pipeline:
        p = Pipeline(settings, stages, **kw)
        made.append(p)
        return p

    yield make
    for p in made:
        p.close()


def test_broker_killed_while_webhooks_arrive(
    make_settings: Callable[..., Settings],
    make_pipeline: Callable[..., Pipeline],
    kafka_service: KafkaService,
) -> None:
    if not kafka_service.can_restart:
        pytest.skip("needs CHARGIFY_TEST_BACKEND=local to kill the broker")
    settings = make_settings(partitions=3, gateway_publish_timeout_s=2.0)
    seed(settings)
    pipeline = make_pipeline(settings)
    bodies = payments(120)
    statuses: list[int] = []
    sender = threading.Thread(target=send_all, args=(pipeline, bodies, statuses))
    try:
        sender.start()
        while len(statuses) < 30:
            time.sleep(0.05)
        kafka_service.kill()
        time.sleep(3)
    finally:
        kafka_service.start()
        sender.join(120)
    assert len(statuses) == len(bodies)
    assert set(statuses) <= {200, 503}, statuses
    assert 503 in statuses, "the broker outage should have been answered with 503"
    # Chargify retries what was not answered 200.
    for body, status in zip(bodies, statuses, strict=True):
        if status != 200:
            pipeline.post_until_accepted(body)
    assert_exactly_once(pipeline, len(bodies))


def test_processor_and_sink_killed_and_postgres_restarted_mid_stream(
    make_settings: Callable[..., Settings],
    make_pipeline: Callable[..., Pipeline],
    postgres_service: PostgresService,
) -> None:
    if not postgres_service.can_restart:
        pytest.skip("needs CHARGIFY_TEST_BACKEND=local to restart Postgres")
    settings = make_settings(partitions=3, sink_batch_size=20)
    seed(settings)
    pipeline = make_pipeline(settings)
    bodies = payments(300)
    for body in bodies[:100]:
        assert pipeline.post(body) == 200
    pipeline.processors[0].kill()
    pipeline.sinks[0].kill()
    for body in bodies[100:200]:
        assert pipeline.post(body) == 200
    pipeline.restart(pipeline.processors[0])
    pipeline.restart(pipeline.sinks[0])
    try:
        time.sleep(1.0)
        postgres_service.stop()
        for body in bodies[200:]:
            assert pipeline.post(body) == 200
        time.sleep(2.0)
    finally:
        postgres_service.start()
    assert_exactly_once(pipeline, len(bodies))
    assert pipeline.sinks[0].running, "the sink must ride out a Postgres restart"


def test_scale_out_survives_losing_a_worker_of_each_stage(
    make_settings: Callable[..., Settings],
    make_pipeline: Callable[..., Pipeline],
) -> None:
    settings = make_settings(partitions=4, sink_batch_size=25)
    seed(settings)
    pipeline = make_pipeline(settings, processors=2, sinks=2)
    bodies = payments(300)
    for body in bodies[:120]:
        assert pipeline.post(body) == 200
    assert_exactly_once(pipeline, 120)
    # One of each stops for good (SIGTERM, as an orchestrator scales down) mid-stream.
    pipeline.processors[1].stop()
    pipeline.sinks[1].stop()
    for body in bodies[120:]:
        assert pipeline.post(body) == 200
    assert_exactly_once(pipeline, len(bodies))


class SteadySender:
    """Posts webhooks at a steady rate from a thread; ``retry_failed`` is Chargify's retry."""

    def __init__(self, pipeline: Pipeline, bodies: list[bytes], rate: float) -> None:
        self.pipeline = pipeline
        self.bodies = bodies
        self.interval = 1.0 / rate
        self.statuses: list[int] = []
        self.thread = threading.Thread(target=self._send, daemon=True)

    def _send(self) -> None:
        next_at = time.monotonic()
        for body in self.bodies:
            self.statuses.append(self.pipeline.post(body))
            next_at += self.interval
            time.sleep(max(0.0, next_at - time.monotonic()))

    def sent(self, count: int, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while len(self.statuses) < count:
            assert time.monotonic() < deadline, f"only {len(self.statuses)} sent"
            time.sleep(0.05)

    def retry_failed(self) -> None:
        self.thread.join(180)
        assert len(self.statuses) == len(self.bodies)
        for body, status in zip(self.bodies, self.statuses, strict=True):
            if status != 200:
                self.pipeline.post_until_accepted(body)


@pytest.mark.timeout(600)
def test_exactly_once_on_the_topic_through_kills_rebalances_and_a_broker_restart(
    make_settings: Callable[..., Settings],
    make_pipeline: Callable[..., Pipeline],
    kafka_service: KafkaService,
) -> None:
    """Two processor workers under a steady stream of payments: one SIGKILLed mid-batch,
    the other SIGKILLed during the rebalance that follows, one SIGTERMed, one frozen past
    its session (a zombie, SIGSTOP then SIGCONT), and the broker SIGKILLed and restarted.
    A read_committed reader sees each transaction once, and Postgres holds each once."""
    if not kafka_service.can_restart:
        pytest.skip("needs CHARGIFY_TEST_BACKEND=local to kill the broker")
    settings = make_settings(partitions=4, sink_batch_size=50, gateway_publish_timeout_s=2.0)
    seed(settings)
    pipeline = make_pipeline(settings, processors=2)
    bodies = payments(3000)
    sender = SteadySender(pipeline, bodies, rate=100)
    sender.thread.start()

    sender.sent(300)
    pipeline.processors[0].kill()  # mid-batch: batches are committed every few ms
    first = pipeline.restart(pipeline.processors[0])
    first.wait_for_log("processor ")  # started: the group rebalances as it joins
    pipeline.processors[1].kill()  # during that rebalance
    pipeline.restart(pipeline.processors[1])

    sender.sent(900)
    first.wait_for_log("assigned")
    assert pipeline.processors[0].stop() == 0  # SIGTERM: the batch in hand is finished
    pipeline.restart(pipeline.processors[0])

    sender.sent(1400)
    zombie = pipeline.processors[1]
    zombie.signal(signal.SIGSTOP)  # past its session: its partitions move to the other
    time.sleep(14)
    zombie.signal(signal.SIGCONT)  # it wakes up mid-batch, in a generation that is gone

    sender.sent(2200)
    try:
        kafka_service.kill()
        time.sleep(3)
    finally:
        kafka_service.start()
    sender.retry_failed()
    # Meanwhile, a supervisor's part: a worker that exited (status 1: a batch stuck in the
    # client across the broker restart) is started again.
    restarted = 0
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:
        for stage in [p for p in pipeline.processors if not p.running]:
            assert stage.proc is not None and stage.proc.returncode == 1, stage.log()[-3000:]
            pipeline.restart(stage)
            restarted += 1
        if pipeline.query("select count(*) from transactions") == [(len(bodies),)]:
            break
        time.sleep(1.0)
    print(f"{restarted} processor(s) exited and were started again")

    expected = Counter(FIRST_TXN + i for i in range(len(bodies)))
    seen = transaction_ids(settings, len(bodies))
    if seen != expected:
        for processor in pipeline.processors:
            processor.dump_stacks()  # where a worker that stopped making progress waits
    assert seen == expected, (
        f"missing {sorted(expected - seen)[:20]}, doubled {sorted(seen - expected)[:20]}"
    )
    assert_exactly_once(pipeline, len(bodies), timeout=180)
    assert all(p.running for p in pipeline.processors)


def test_one_event_under_two_webhook_ids_is_recorded_once(
    make_settings: Callable[..., Settings],
    make_pipeline: Callable[..., Pipeline],
) -> None:
    """Chargify sends one event to each of two endpoints (e.g. while a site moves its
    endpoint): two webhook ids, the same event id and transaction id."""
    settings = make_settings(partitions=2)
    seed(settings)
    pipeline = make_pipeline(settings)
    same = {"transaction_id": FIRST_TXN, "event_id": 77_000_001, "subscription_id": 9_000}
    first, second = (
        build_body("payment_success", webhook_id=wid, reference="cust-0", amount_cents=100, **same)
        for wid in (3_000_000_010, 3_000_000_011)
    )
    assert pipeline.post(first) == 200
    assert_exactly_once(pipeline, 1)
    assert pipeline.post(second) == 200
    assert pipeline.post(first) == 200  # and a Chargify retry of the first
    time.sleep(3)
    assert_exactly_once(pipeline, 1)
    assert transaction_ids(settings, 1) == Counter([FIRST_TXN])
