"""Sending replays: what is published, pacing, and saying what was not done."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from chargify_stream.dlq import DeadLetterEvent, group_events, send_replays
from tests.unit.test_dlq_events import RAW, RETRY, dead_letter


@dataclass
class FakeProducer:
    """Acknowledges the first ``ack`` records on flush; fails the rest like a broker gone."""

    ack: int = 1_000
    sent: list[dict[str, Any]] = field(default_factory=list)
    polled: float = 0.0
    callbacks: list[Callable[[Any, Any], None]] = field(default_factory=list)

    def produce(self, topic: str, **kwargs: Any) -> None:
        self.sent.append({"topic": topic, **kwargs})
        self.callbacks.append(kwargs["on_delivery"])

    def poll(self, timeout: float = 0.0, /) -> int:
        self.polled += timeout
        return 0

    def flush(self, timeout: float = 0.0, /) -> int:
        for i, report in enumerate(self.callbacks):
            report(None if i < self.ack else FakeError(), None)
        return 0


class FakeError:
    def str(self) -> str:
        return "Local: Message timed out"


def events(n: int) -> list[DeadLetterEvent]:
    return group_events(dead_letter(webhook=str(i), replay_count=1) for i in range(n))


def test_a_replay_is_the_latest_record_with_original_headers_and_count_plus_one() -> None:
    [event] = events(1)
    producer = FakeProducer()
    outcome = send_replays([event], producer, sink_retry_topic=RETRY)
    assert outcome.acked == [event] and not outcome.failed and not outcome.not_sent
    [sent] = producer.sent
    # A sink dead letter: to the retry topic, partitioned by key (no partition given).
    assert sent["topic"] == RETRY
    assert "partition" not in sent
    assert sent["key"] == b"cust-1"
    assert sent["value"] == event.latest.value
    assert sent["headers"] == [
        ("chargify-webhook-id", b"0"),
        ("chargify-event", b"payment_success"),
        ("dlq-replay-count", b"2"),
    ]


def test_records_the_broker_did_not_acknowledge_are_reported_failed() -> None:
    selected = events(5)
    outcome = send_replays(selected, FakeProducer(ack=3), sink_retry_topic=RETRY)
    assert outcome.acked == selected[:3]
    assert [e for e, _ in outcome.failed] == selected[3:]
    assert outcome.failed[0][1] == "Local: Message timed out"


def test_rate_limits_records_per_second() -> None:
    now = [0.0]
    producer = FakeProducer()

    def poll(timeout: float = 0.0, /) -> int:
        now[0] += timeout  # the fake clock moves only while the producer is polled
        return 0

    producer.poll = poll  # type: ignore[method-assign]
    send_replays(events(11), producer, sink_retry_topic=RETRY, rate=5.0, clock=lambda: now[0])
    assert len(producer.sent) == 11
    assert now[0] == 2.0  # 11 records at 5/s: the last one goes out at t = 10/5


def test_interrupted_replay_says_what_was_not_sent() -> None:
    selected = events(4)

    class Interrupting(FakeProducer):
        def produce(self, topic: str, **kwargs: Any) -> None:
            if len(self.sent) == 2:
                raise KeyboardInterrupt
            super().produce(topic, **kwargs)

    outcome = send_replays(selected, Interrupting(), sink_retry_topic=RETRY)
    assert outcome.interrupted
    assert outcome.acked == selected[:2]
    assert outcome.not_sent == selected[2:]


def test_a_processor_dead_letter_goes_back_to_its_source_partition() -> None:
    [event] = group_events(
        [dead_letter(reason="malformed_payload", stage="processor", source=RAW, key=b"151")]
    )
    producer = FakeProducer()
    send_replays([event], producer, sink_retry_topic=RETRY)
    [sent] = producer.sent
    assert (sent["topic"], sent["partition"], sent["key"]) == (RAW, 0, b"151")
