"""One batch of raw webhooks -> the records to publish and what the tables should learn.

This is the worker's logic without Kafka: :func:`split` turns raw records into
``Outgoing`` records (Avro on the two output topics, or the original bytes on the
dead-letter topic), the (subscription id -> customer reference) pairs learnt on the way,
and the webhook ids to remember as seen once the outputs are acknowledged. The worker
(:mod:`processors.worker`) does the I/O around it.

Per record, in order:

1. :func:`processors.routing.route` decides, resolving a missing customer reference from
   the references known so far, including those learnt earlier in the same batch;
2. the decision becomes an Avro record with the raw record's ``chargify-webhook-id``,
   ``chargify-event`` and ``received-at`` headers, or a dead letter carrying the raw key,
   bytes and headers plus the ``dlq-*`` headers, or nothing (ignored: counted and logged);
3. an Avro record any of whose dedup keys was already emitted (within the dedup window, or
   earlier in the batch) is dropped. Its keys: its webhook id (a retry or replay of the same
   webhook: decided ``duplicate``), and its Chargify transaction id for a transaction
   (DESIGN.md's one record per transaction id, whichever webhook carried it) or Chargify's
   event id for a subscription change (the same under every webhook id, e.g. one event
   sent to two endpoints): another webhook for what was emitted is decided ``unchanged``.
   The keys of a batch are looked up in one query.

A webhook ignored or dropped as a duplicate also gets a decision record
(:mod:`schemas.decisions`) in ``Split.decisions``, published with the outputs (in the same
transaction), so that ``webhook_outcomes`` learns what became of it.

Only emitted records are remembered: a webhook that was dead-lettered, say for an unknown
subscription, gets a fresh chance if Chargify sends it again or an operator replays it.
A dead-letter replay of an emitted webhook is a duplicate like any other: the typed topics
hold each transaction once, whoever sends it again.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field
from typing import Final, Literal, NamedTuple, Protocol

from chargify_stream.base.logs import fields, log_failure
from chargify_stream.processors.routing import SUPPORTED_EVENTS, DeadLetter, Emit, Ignore, route
from chargify_stream.schemas import headers as h
from chargify_stream.schemas.codec import encode
from chargify_stream.schemas.deadletter import dead_letter_headers, pointer
from chargify_stream.schemas.decisions import Decision, encode_decision, now
from chargify_stream.schemas.records import Transaction

__all__ = ["Incoming", "Outgoing", "Split", "State", "Tally", "dedup_keys", "fallback", "split"]

log = logging.getLogger(__name__)

Headers = list[tuple[str, bytes]]
OutputTopic = Literal["transactions", "subscriptions", "deadletter", "decisions"]

# Event labels for metrics: the events we act on and the test event; anything else is
# "other", so a body cannot grow the label set.
_EVENT_LABELS: Final = SUPPORTED_EVENTS | {"test"}

DUPLICATE: Final = "duplicate"
UNCHANGED: Final = "unchanged"
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
    """What the state knows (:class:`processors.state.Store` implements it)."""

    def reference(self, partition: int, subscription_id: str) -> str | None:
        """The customer reference learnt for a subscription, or ``None``."""

    def seen(self, keys: Collection[int]) -> set[int]:
        """Those of the dedup keys emitted within the dedup window."""


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
    # raw partition -> dedup keys emitted, to remember once the batch is committed.
    emitted: dict[int, list[int]] = field(default_factory=dict)
    # raw partition -> offset of the batch's first record from it (names a dedup record).
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


# A dedup key is a Chargify id times 4 plus its kind, so ids of different kinds never meet;
# kept within a signed 64-bit integer (Chargify's ids are about 10**10: none wrap).
WEBHOOK_KEY, EVENT_KEY, TRANSACTION_KEY = 1, 2, 3
_KEY_SPACE = 1 << 63


def dedup_keys(emit: Emit) -> tuple[int, ...]:
    """The keys an emitted record is deduplicated on (see the module docstring); the
    webhook id's first."""
    record = emit.record
    keys = [(record.webhook_id * 4 + WEBHOOK_KEY) % _KEY_SPACE]
    if isinstance(record, Transaction):
        keys.append((record.transaction_id * 4 + TRANSACTION_KEY) % _KEY_SPACE)
    elif record.event_id is not None:
        keys.append((record.event_id * 4 + EVENT_KEY) % _KEY_SPACE)
    return tuple(keys)


def split(batch: Sequence[Incoming], state: State) -> Split:
    """Decide every record of ``batch`` (see the module docstring)."""
    result = Split()
    tally = result.tally
    learned_now: dict[tuple[int, str], str] = {}  # (partition, subscription id) -> reference
    # In order: (output, (partition, dedup keys) of an Avro record, event, webhook id,
    # the raw record, its received-at, its replay count).
    decided: list[
        tuple[
            Outgoing,
            tuple[int, tuple[int, ...]] | None,
            str | None,
            str | None,
            Incoming,
            str | None,
            int,
        ]
    ] = []

    for record in batch:
        partition = record.partition
        result.first_offsets.setdefault(partition, record.offset)
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

        def lookup(subscription_id: int, partition: int = partition) -> str | None:
            sid = str(subscription_id)
            return learned_now.get((partition, sid)) or state.reference(partition, sid)

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
                learned_now[partition, sid] = reference
                result.learned[partition, sid] = reference
        if isinstance(action, Emit) and outgoing is not None:
            emit = (partition, dedup_keys(action))
            decided.append((outgoing, emit, event, webhook_id, record, received_at, replays))
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
                partition,
                record.offset,
                action.reason,
                action.error,
                extra=fields(webhook_id, event, DEAD_LETTERED, action.reason),
            )
            dead = _dead_letter(record, action.reason, action.error)
            decided.append((dead, None, event, webhook_id, record, received_at, replays))

    already = state.seen({key for _, keyed, *_ in decided if keyed for key in keyed[1]})
    for outgoing, keyed, event, webhook_id, record, received_at, replays in decided:
        if keyed is not None:
            partition, keys = keyed
            if any(key in already for key in keys):
                # The same webhook again (a retry, a replay) is a duplicate; another webhook
                # for an event or transaction already emitted leaves the data unchanged.
                verdict = DUPLICATE if keys[0] in already else UNCHANGED
                tally.events[_event_label(event), DUPLICATE] += 1
                log.info(
                    "dropped %s webhook %s (%s)",
                    "duplicate" if verdict == DUPLICATE else "already emitted",
                    webhook_id,
                    event,
                    extra=fields(webhook_id, event, verdict),
                )
                result.note(record, webhook_id, verdict, None, event, received_at, replays)
                continue
            already.update(keys)
            result.emitted.setdefault(partition, []).extend(keys)
            tally.events[_event_label(event), EMITTED] += 1
            tally.published[outgoing.topic] += 1
        result.outgoing.append(outgoing)
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
