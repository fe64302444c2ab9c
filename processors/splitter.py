"""One batch of raw webhooks -> the records to publish and what the tables should learn.

This is the worker's logic without Kafka: :func:`split` turns raw records into
``Outgoing`` records (Avro on the two output topics, or the original bytes on the
dead-letter topic), the (subscription id -> customer reference) pairs learnt on the way,
and the webhook ids to remember as seen once the outputs are acknowledged. The worker
(:mod:`processors.worker`) does the I/O around it.

Per record, in order:

1. an exact duplicate (its webhook id already emitted, within the dedup window or earlier
   in the batch) is dropped, unless it is a dead-letter replay (``dlq-replay-count`` > 0),
   which an operator sent on purpose;
2. :func:`processors.routing.route` decides, resolving a missing customer reference from
   the references known so far, including those learnt earlier in the same batch;
3. the decision becomes an Avro record with the raw record's ``chargify-webhook-id``,
   ``chargify-event`` and ``received-at`` headers (and ``chargify-raw-position``, where the
   raw record is), or a dead letter carrying the raw key,
   bytes and headers plus the ``dlq-*`` headers, or nothing (ignored: counted and logged).

A webhook ignored or dropped as a duplicate also gets a decision record
(:mod:`schemas.decisions`) in ``Split.decisions``, published with the outputs, so that
``webhook_outcomes`` learns what became of it.

Only emitted webhooks are remembered as seen: a webhook that was dead-lettered, say for an
unknown subscription, gets a fresh chance if Chargify sends it again.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Final, Literal, NamedTuple, Protocol

from chargify_stream.logs import fields, log_failure
from processors.routing import SUPPORTED_EVENTS, DeadLetter, Emit, Ignore, route
from schemas import headers as h
from schemas.codec import encode
from schemas.deadletter import dead_letter_headers, pointer
from schemas.decisions import Decision, encode_decision, now

__all__ = ["Incoming", "Outgoing", "Pending", "Split", "State", "Tally", "fallback", "split"]

log = logging.getLogger(__name__)

Headers = list[tuple[str, bytes]]
OutputTopic = Literal["transactions", "subscriptions", "deadletter", "decisions"]

# Event labels for metrics: the events we act on and the test event; anything else is
# "other", so a body cannot grow the label set.
_EVENT_LABELS: Final = SUPPORTED_EVENTS | {"test"}

DUPLICATE: Final = "duplicate"
EMITTED: Final = "emitted"
IGNORED: Final = "ignored"
DEAD_LETTERED: Final = "dead_lettered"


# Named tuples, not dataclasses: one of each is made per webhook, and a frozen
# dataclass takes several times as long to build.
class Incoming(NamedTuple):
    """One record of the raw topic."""

    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes
    headers: Headers


class Outgoing(NamedTuple):
    """One record to publish; ``topic`` is the logical name, resolved by the worker.

    ``source`` is the raw record an output record was decided from: if Kafka refuses the
    output record, that raw record is dead-lettered instead (:func:`fallback`). ``value``
    is ``None`` only on a pointer (see ``schemas.deadletter``).
    """

    topic: OutputTopic
    key: bytes | None
    value: bytes | None
    headers: Headers
    source: Incoming | None = None


class State(Protocol):
    """What the tables know (the worker's ``processors.state`` objects implement it)."""

    def reference(self, subscription_id: str) -> str | None:
        """The customer reference learnt for a subscription, or ``None``."""

    def is_duplicate(self, webhook_id: str) -> bool:
        """Whether the webhook was emitted within the dedup window."""


class Pending:
    """``state`` plus what a batch still on its way (``ahead``) will write to it.

    The worker splits the next batch while the last one's outputs are being
    acknowledged; the tables learn from that batch only afterwards.
    """

    def __init__(self, state: State, ahead: Split) -> None:
        self._state = state
        self._learned = {sid: ref for (_, sid), ref in ahead.learned.items()}
        self._emitted = {wid for ids in ahead.emitted.values() for wid in ids}

    def reference(self, subscription_id: str) -> str | None:
        return self._learned.get(subscription_id) or self._state.reference(subscription_id)

    def is_duplicate(self, webhook_id: str) -> bool:
        return webhook_id in self._emitted or self._state.is_duplicate(webhook_id)


@dataclass
class Tally:
    """Counts for the metrics and the periodic log line."""

    events: Counter[tuple[str, str]] = field(default_factory=Counter)  # (event, outcome)
    published: Counter[str] = field(default_factory=Counter)  # output topic
    dead_letters: Counter[str] = field(default_factory=Counter)  # reason
    ignored: Counter[str] = field(default_factory=Counter)  # reason

    def add(self, other: Tally) -> None:
        self.events.update(other.events)
        self.published.update(other.published)
        self.dead_letters.update(other.dead_letters)
        self.ignored.update(other.ignored)

    def summary(self) -> str:
        """``emitted=.. ignored=.. dead_lettered=.. duplicate=..``, for a log line."""
        outcomes: Counter[str] = Counter()
        for (_, outcome), n in self.events.items():
            outcomes[outcome] += n
        return " ".join(
            f"{outcome}={outcomes[outcome]}"
            for outcome in (EMITTED, IGNORED, DEAD_LETTERED, DUPLICATE)
        )


@dataclass
class Split:
    """The result of one batch."""

    outgoing: list[Outgoing] = field(default_factory=list)
    # (raw partition, subscription id) -> customer reference, new or changed.
    learned: dict[tuple[int, str], str] = field(default_factory=dict)
    # raw partition -> webhook ids emitted, to remember once the outputs are acknowledged.
    emitted: dict[int, list[str]] = field(default_factory=dict)
    # raw partition -> offset of the batch's first record from it (names a seen-table entry).
    first_offsets: dict[int, int] = field(default_factory=dict)
    tally: Tally = field(default_factory=Tally)
    # Records for the decisions topic (ignored, duplicate), to publish with ``outgoing``.
    decisions: list[Outgoing] = field(default_factory=list)

    def note(
        self,
        record: Incoming,
        webhook_id: str | None,
        decision: str,
        reason: str | None,
        event: str | None,
        received_at: str | None,
        replay_count: int,
    ) -> None:
        """Add a decision record for ``record`` (none without a webhook id to key it)."""
        if not webhook_id:
            return
        value = encode_decision(
            Decision(
                webhook_id,
                decision,
                reason,
                event,
                received_at,
                now(),
                record.topic,
                record.partition,
                record.offset,
                replay_count,
            )
        )
        self.decisions.append(Outgoing("decisions", webhook_id.encode(), value, []))


def _event_label(event: str | None) -> str:
    return event if event in _EVENT_LABELS else "other"


def raw_position(record: Incoming) -> bytes:
    """The ``chargify-raw-position`` header value of a record split from ``record``."""
    return f"{record.topic}/{record.partition}/{record.offset}".encode()


def _replay_count(value: bytes) -> int:
    """A ``dlq-replay-count`` header's count (above 0: a dead-letter replay)."""
    try:
        return max(int(value), 0)
    except ValueError:
        return 0


def split(batch: Sequence[Incoming], state: State) -> Split:
    """Decide every record of ``batch`` (see the module docstring)."""
    result = Split()
    tally = result.tally
    learned_now: dict[str, str] = {}  # subscription id -> reference, this batch
    emitted_now: set[str] = set()

    def lookup(subscription_id: int) -> str | None:
        sid = str(subscription_id)
        return learned_now.get(sid) or state.reference(sid)

    for record in batch:
        result.first_offsets.setdefault(record.partition, record.offset)
        header_id = event_header = received_at = None
        replays = 0
        for name, value in record.headers:
            if name == h.WEBHOOK_ID:
                header_id = value.decode(errors="replace")
            elif name == h.EVENT:
                event_header = value.decode(errors="replace")
            elif name == h.RECEIVED_AT:
                received_at = value.decode(errors="replace")
            elif name == h.DLQ_REPLAY_COUNT:
                replays = _replay_count(value)
        replayed = replays > 0
        if (
            header_id
            and not replayed
            and (header_id in emitted_now or state.is_duplicate(header_id))
        ):
            tally.events[_event_label(event_header), DUPLICATE] += 1
            log.info(
                "dropped duplicate webhook %s (%s)",
                header_id,
                event_header,
                extra=fields(header_id, event_header, DUPLICATE),
            )
            result.note(record, header_id, DUPLICATE, None, event_header, received_at, replays)
            continue
        try:
            decision = route(record.value, lookup)
            action = decision.action
            outgoing = (
                Outgoing(
                    action.topic,
                    action.key.encode(),
                    encode(action.record),
                    [
                        *((k, v) for k, v in record.headers if k in h.CARRIED_TO_OUTPUTS),
                        (h.RAW_POSITION, raw_position(record)),
                    ],
                    record,
                )
                if isinstance(action, Emit)
                else None
            )
        except Exception as exc:  # a bug, not bad input: route never raises for that
            log_failure(log, "processing webhook %s failed; dead-lettering it", header_id, exc=exc)
            action = DeadLetter(h.MALFORMED_PAYLOAD, f"processor error: {type(exc).__name__}")
            decision = None
            outgoing = None
        event = (decision.event if decision is not None else None) or event_header
        webhook_id = header_id or (
            str(decision.webhook_id)
            if decision is not None and decision.webhook_id is not None
            else None
        )
        if decision is not None and decision.learn is not None:
            sid, reference = str(decision.learn[0]), decision.learn[1]
            if lookup(decision.learn[0]) != reference:
                learned_now[sid] = reference
                result.learned[record.partition, sid] = reference
        if isinstance(action, Emit) and outgoing is not None:
            # No id header to check before routing: check the body's id instead.
            if (
                header_id is None
                and webhook_id
                and not replayed
                and (webhook_id in emitted_now or state.is_duplicate(webhook_id))
            ):
                tally.events[_event_label(event), DUPLICATE] += 1
                log.info(
                    "dropped duplicate webhook %s (%s)",
                    webhook_id,
                    event,
                    extra=fields(webhook_id, event, DUPLICATE),
                )
                result.note(record, webhook_id, DUPLICATE, None, event, received_at, replays)
                continue
            result.outgoing.append(outgoing)
            if webhook_id:
                emitted_now.add(webhook_id)
                result.emitted.setdefault(record.partition, []).append(webhook_id)
            tally.events[_event_label(event), EMITTED] += 1
            tally.published[action.topic] += 1
        elif isinstance(action, Ignore):
            tally.events[_event_label(event), IGNORED] += 1
            tally.ignored[action.reason] += 1
            log.info(
                "ignored webhook %s (%s): %s",
                webhook_id,
                event,
                action.reason,
                extra=fields(webhook_id, event, IGNORED, action.reason),
            )
            result.note(record, webhook_id, IGNORED, action.reason, event, received_at, replays)
        else:
            assert isinstance(action, DeadLetter)
            tally.events[_event_label(event), DEAD_LETTERED] += 1
            tally.dead_letters[action.reason] += 1
            tally.published["deadletter"] += 1
            log.warning(
                "dead-lettering webhook %s (%s) from %s[%d]@%d: %s: %s",
                webhook_id,
                event,
                record.topic,
                record.partition,
                record.offset,
                action.reason,
                action.error,
                extra=fields(webhook_id, event, DEAD_LETTERED, action.reason),
            )
            result.outgoing.append(_dead_letter(record, action.reason, action.error))
    return result


def _dead_letter(record: Incoming, reason: str, error: str) -> Outgoing:
    """The dead letter of a raw record: its key, bytes and headers, plus the ``dlq-*`` ones."""
    return Outgoing(
        "deadletter",
        record.key,
        record.value,
        dead_letter_headers(
            reason=reason,
            stage=h.STAGE_PROCESSOR,
            error=error,
            source_topic=record.topic,
            source_partition=record.partition,
            source_offset=record.offset,
            original_headers=record.headers,
        ),
    )


def fallback(record: Outgoing, refusal: str) -> Outgoing | None:
    """What to publish instead of ``record``, which Kafka refused for itself (``refusal``).

    An output record becomes the dead letter of the raw record it came from
    (``malformed_payload``); a dead letter becomes a pointer to it (``schemas.deadletter``);
    a pointer has no fallback (``None``): a dead-letter topic that refuses even a pointer
    is misconfigured, which no record can fix.
    """
    if record.topic != "deadletter":
        if record.source is None:
            return None
        return _dead_letter(
            record.source,
            h.MALFORMED_PAYLOAD,
            f"its {record.topic} record was refused by Kafka: {refusal}",
        )
    if record.value is None or any(name == h.DLQ_POINTER for name, _ in record.headers):
        return None
    key, headers = pointer(record.key, len(record.value), record.headers, refusal=refusal)
    return Outgoing("deadletter", key, None, headers)
