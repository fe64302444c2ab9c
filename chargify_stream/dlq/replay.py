"""Replaying dead letters: where each goes, which are refused, and publishing them.

``replay`` re-publishes each selected event's latest record (value, key and original
headers, with ``dlq-replay-count`` + 1) and reports what the broker acknowledged. Where to:
a ``dlq-stage=processor`` record back to its ``dlq-source-topic`` and source partition (the
raw topic); a ``dlq-stage=sink`` record to the sink's retry topic (``chargify.sink.retry``),
partitioned by key, never to the typed topics again (their readers see each record once).
A sink dead letter whose source is the retry topic (a retry that failed again) is the same
event as its first failure and goes back there too. It refuses records without ``dlq-*``
headers, records whose source is not an input topic of this pipeline, and events that
already failed ``--max-attempts`` times. Every stage is idempotent, so replaying twice never
double-counts.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, cast

from confluent_kafka import KafkaError, Message

from chargify_stream.dlq.events import DeadLetterEvent, time_text
from chargify_stream.resolved import Resolution
from chargify_stream.schemas import headers as h
from chargify_stream.schemas.deadletter import DeadLetterInfo, replay_headers

DEFAULT_MAX_ATTEMPTS = 5


def replay_destination(info: DeadLetterInfo, sink_retry_topic: str) -> tuple[str, int | None]:
    """The topic and partition a replay of this dead letter goes to (``None``: by key).

    A sink dead letter goes to the sink's retry topic, whatever topic it was read from; a
    processor dead letter back where it was read (the raw topic), on the same partition.
    """
    if info.stage == h.STAGE_SINK:
        return sink_retry_topic, None
    return info.source_topic, info.source_partition


@dataclass(frozen=True, slots=True)
class ReplayPlan:
    """The selected events, split into those to replay and those refused (with why)."""

    replay: list[DeadLetterEvent]
    refused: list[tuple[DeadLetterEvent, str]]


def plan_replay(
    events: Iterable[DeadLetterEvent],
    *,
    max_attempts: int,
    input_topics: Iterable[str],
    sink_retry_topic: str,
    existing_topics: Iterable[str] | None = None,
    resolved: Mapping[str, Resolution] | None = None,
) -> ReplayPlan:
    """Decide, for each selected event, whether it may be replayed (pure).

    ``input_topics`` are the topics a dead letter may have been read from;
    ``existing_topics`` (when given) those a replay may go to; ``resolved`` the webhooks a
    later delivery already took to a good outcome (:mod:`chargify_stream.resolved`).
    """
    inputs = set(input_topics)
    existing = None if existing_topics is None else set(existing_topics)
    replay: list[DeadLetterEvent] = []
    refused: list[tuple[DeadLetterEvent, str]] = []
    for event in events:
        info = event.info
        if info is None:
            refused.append(
                (event, "no dlq-* headers (not written by this pipeline): never replayed blindly")
            )
        elif resolved and (done := resolved.get(event.webhook_id or "")):
            outcome, at = done
            refused.append(
                (event, f"resolved: {outcome} at {time_text(at)} (--include-resolved to replay it)")
            )
        elif event.latest.value is None and info.pointer:
            refused.append(
                (
                    event,
                    f"a pointer, and its original at {info.source_topic}"
                    f"[{info.source_partition}]@{info.source_offset} is no longer there",
                )
            )
        elif event.latest.value is None:
            refused.append((event, "the dead letter has no value"))
        elif event.attempts >= max_attempts:
            refused.append(
                (event, f"failed {event.attempts} times (--max-attempts {max_attempts})")
            )
        elif info.source_topic not in inputs:
            refused.append(
                (event, f"source topic {info.source_topic} is not an input of this pipeline")
            )
        elif (
            existing is not None
            and (target := replay_destination(info, sink_retry_topic)[0]) not in existing
        ):
            refused.append((event, f"topic {target} does not exist"))
        else:
            replay.append(event)
    return ReplayPlan(replay, refused)


class ProducerLike(Protocol):
    """The part of ``confluent_kafka.Producer`` a replay uses."""

    def produce(self, topic: str, *args: Any, **kwargs: Any) -> None: ...
    def poll(self, timeout: float = ..., /) -> int: ...
    def flush(self, timeout: float = ..., /) -> int: ...


@dataclass
class ReplayOutcome:
    """What the broker acknowledged; ``failed`` were refused or never acknowledged."""

    acked: list[DeadLetterEvent] = field(default_factory=list)
    failed: list[tuple[DeadLetterEvent, str]] = field(default_factory=list)
    not_sent: list[DeadLetterEvent] = field(default_factory=list)
    interrupted: bool = False


def send_replays(
    events: Sequence[DeadLetterEvent],
    producer: ProducerLike,
    *,
    sink_retry_topic: str,
    rate: float | None = None,
    flush_timeout: float = 45.0,
    clock: Callable[[], float] = time.monotonic,
) -> ReplayOutcome:
    """Re-publish each event's latest dead letter (to :func:`replay_destination`); wait for
    the broker.

    At most ``rate`` records per second. Ctrl-C stops sending; what was already handed to
    the producer is still flushed, and the outcome says which records were never sent.
    """
    outcome = ReplayOutcome()
    reports: dict[int, str | None] = {}

    def report_for(index: int) -> Callable[[KafkaError | None, Message], None]:
        def report(err: KafkaError | None, _msg: Message) -> None:
            reports[index] = None if err is None else err.str()

        return report

    started = clock()
    sent = 0
    try:
        for index, event in enumerate(events):
            if rate:
                # Pace by serving delivery reports until this record's slot comes.
                slot = started + index / rate
                while (wait := slot - clock()) > 0:
                    producer.poll(wait)
            topic, partition = replay_destination(
                cast(DeadLetterInfo, event.info), sink_retry_topic
            )
            placement = {} if partition is None else {"partition": partition}
            producer.produce(
                topic,
                value=event.latest.value,
                key=event.latest.key,
                headers=replay_headers(event.latest.headers),
                on_delivery=report_for(index),
                **placement,
            )
            sent = index + 1
            producer.poll(0)
    except KeyboardInterrupt:
        outcome.interrupted = True
    remaining = producer.flush(flush_timeout)
    for index, event in enumerate(events[:sent]):
        error = reports.get(index, "no acknowledgement from the broker")
        if error is None:
            outcome.acked.append(event)
        else:
            outcome.failed.append((event, error))
    outcome.not_sent = list(events[sent:])
    if remaining and not outcome.failed:  # pragma: no cover - flush() and reports disagree
        outcome.failed.append((events[sent - 1], "no acknowledgement from the broker"))
    return outcome
