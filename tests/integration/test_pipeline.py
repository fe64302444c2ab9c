"""The batch pipeline (``processors.pipeline``) in this process, against the real broker.

No Faust here: the pipeline is built from its clients, as the worker builds it, and driven
batch by batch, so a test can stop a worker between deciding a batch and committing it.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from confluent_kafka import Consumer, Producer

from chargify_stream.base.settings import Settings
from chargify_stream.processors.clients import (
    consumer_config,
    ensure_changelogs,
    producer_config,
    restorer_config,
    transactional_id,
)
from chargify_stream.processors.metrics import ProcessorMetrics
from chargify_stream.processors.pipeline import Pipeline, incoming
from chargify_stream.processors.splitter import Incoming
from chargify_stream.processors.state import Store
from tests.integration.test_processor import committed, webhook
from tests.kafka_tools import consume, produce, transaction_ids

pytestmark = pytest.mark.integration

MakePipeline = Callable[..., Pipeline]


@pytest.fixture
def make_pipeline(tmp_path: Path) -> Iterator[MakePipeline]:
    made: list[Pipeline] = []

    def make(settings: Settings, slot: int, partitions: int, **consumer: Any) -> Pipeline:
        folder = tmp_path / f"slot-{slot}"
        folder.mkdir(exist_ok=True)
        pipeline = Pipeline(
            settings,
            consumer=Consumer({**consumer_config(settings), **consumer}),
            make_producer=lambda: Producer(
                producer_config(settings, transactional_id(settings, slot))
            ),
            make_restorer=lambda: Consumer(restorer_config(settings)),
            store=Store(folder, settings.processor_dedup_window_s),
            changelogs=ensure_changelogs(settings, partitions),
            metrics=ProcessorMetrics(),
        )
        made.append(pipeline)
        return pipeline

    yield make
    for pipeline in made:
        pipeline.close()


def payments(count: int, start: int = 0) -> list[Any]:
    return [
        webhook(
            "payment_success",
            webhook_id=50_000 + i,
            subscription_id=600 + i % 9,
            reference=f"c-{i % 9}",
            transaction_id=80_000 + i,
        )
        for i in range(start, start + count)
    ]


def take_batch(pipeline: Pipeline, timeout: float = 30.0) -> list[Incoming]:
    """Join the group and read one batch, without processing it."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        messages = pipeline.consumer.consume(1000, 0.5)
        batch = [incoming(m) for m in messages if m.error() is None]
        if batch:
            return batch
    raise AssertionError("no batch")


def run_until(pipeline: Pipeline, done: Callable[[], bool], timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not done():
        assert time.monotonic() < deadline, "timed out"
        pipeline.step(0.2)


def test_a_worker_that_left_the_group_cannot_commit_its_batch(
    make_settings: Callable[..., Settings], make_pipeline: MakePipeline
) -> None:
    """A worker that stops polling past max.poll.interval.ms (a zombie) loses its
    partitions; the batch it still holds is aborted, whatever it already sent."""
    settings = make_settings(partitions=2)
    produce(settings.kafka_bootstrap_servers, settings.topic("raw"), payments(300))
    zombie = make_pipeline(
        settings, 0, 2, **{"session.timeout.ms": 6000, "max.poll.interval.ms": 7000}
    )
    zombie.open()
    held = take_batch(zombie)
    assert committed(settings, 2) <= 0

    other = make_pipeline(settings, 1, 2)
    other.open()
    run_until(other, lambda: committed(settings, 2) == 300, timeout=90)

    assert zombie.process(held) is False  # aborted: its outputs are never seen
    assert transaction_ids(settings, 300, timeout=30, settle=1.0) == Counter(
        80_000 + i for i in range(300)
    )
    assert committed(settings, 2) == 300


def test_state_moves_with_the_partitions(
    make_settings: Callable[..., Settings], make_pipeline: MakePipeline
) -> None:
    """What one worker committed (dedup keys, references) is restored by the next owner
    from the changelogs: a duplicate is dropped, an allocation change resolved."""
    settings = make_settings(partitions=2)
    bootstrap, raw = settings.kafka_bootstrap_servers, settings.topic("raw")
    signup = webhook("signup_success", webhook_id=1, subscription_id=77, reference="c-77")
    payment = webhook("payment_success", webhook_id=2, subscription_id=77, reference="c-77")
    produce(bootstrap, raw, [signup, payment])
    first = make_pipeline(settings, 0, 2)
    first.open()
    run_until(first, lambda: committed(settings, 2) == 2)
    first.close()

    produce(bootstrap, raw, [
        payment,  # a Chargify retry of an emitted webhook
        webhook("component_allocation_change", webhook_id=3, subscription_id=77),
    ])  # fmt: skip
    second = make_pipeline(settings, 1, 2)  # another slot: nothing local, all from Kafka
    second.open()
    run_until(second, lambda: committed(settings, 2) == 4)
    assert second.totals.tally.summary() == "emitted=1 ignored=0 dead_lettered=0 duplicate=1"
    subscriptions = consume(bootstrap, settings.topic("subscriptions"), count=2, settle=1.0)
    assert [m.key() for m in subscriptions] == [b"c-77", b"c-77"]
