"""``chargify-stream dlq list|stats|replay``: what is parked on the dead-letter topic, and replay.

Every command reads the whole dead-letter topic as it is when the command starts (up to
each partition's high watermark; no consumer group, nothing committed) and groups its
records into **events**, shown once each however often they failed. The read is a stream:
of each event only a summary is kept (:mod:`.events`), so memory grows with the number of
events, not with the size of their values; ``replay`` reads back the values it sends by
position (:func:`.scan.fill_latest`).

Identity of an event (:func:`schemas.deadletter.event_identity`, shared with the sink's
re-driver):

- its ``chargify-webhook-id`` header, when present. Every record of the pipeline carries
  it, one webhook yields at most one record per topic, and it survives replays. The
  ``dlq-source-*`` position does not: a replay re-publishes to the source topic at a new
  offset, so a record that fails again names a new source offset, and an event that failed
  at the processor, was replayed, and then failed at the sink names a new source topic too.
  The webhook id ties all of those into one event, shown with its latest failure;
- else the failed record's ``dlq-source-topic``/partition/offset;
- else (a record without ``dlq-*`` headers, written by hand or another tool) the
  dead-letter record's own position. Such a record is shown but never replayed blindly.

The latest failure of an event is its record with the highest ``dlq-replay-count``, then
the latest ``dlq-failed-at`` (:func:`schemas.deadletter.recency`). ``attempts`` is that
count + 1: how often the event failed. Filters apply to events: ``--reason``, ``--event``,
``--customer`` (the record key of a sink dead letter; processor dead letters are keyed by
subscription id and carry no resolved customer), ``--since``/``--until`` (on the latest
``dlq-failed-at``; inclusive/exclusive).

Replay: :mod:`.replay`. A **pointer** (a dead letter Kafka could not take whole:
``schemas.deadletter``) has no value; ``list`` marks it, and ``replay`` reads its original
back from its source topic, partition and offset (:func:`.scan.read_originals`) and
replays that, with the pointer's count + 1. A pointer whose original is gone (deleted by
the source topic's retention) is refused.

Modules: :mod:`.events` (records, events, filters), :mod:`.scan` (reading the topic),
:mod:`.replay`, :mod:`.report` (what is printed), :mod:`.cli` (arguments, running).
"""

from __future__ import annotations

from chargify_stream.dlq.cli import ReplayError, add_arguments, filters_from, run
from chargify_stream.dlq.events import (
    NO_HEADERS,
    DeadLetterEvent,
    DeadLetterRecord,
    EventGrouper,
    Filters,
    group_events,
    identity,
)
from chargify_stream.dlq.replay import (
    DEFAULT_MAX_ATTEMPTS,
    ProducerLike,
    ReplayOutcome,
    ReplayPlan,
    plan_replay,
    replay_destination,
    send_replays,
)
from chargify_stream.dlq.report import format_age
from chargify_stream.dlq.scan import Progress, Scan, fill_latest, read_originals, scan

__all__ = [
    "DEFAULT_MAX_ATTEMPTS",
    "NO_HEADERS",
    "DeadLetterEvent",
    "DeadLetterRecord",
    "EventGrouper",
    "Filters",
    "ProducerLike",
    "Progress",
    "ReplayError",
    "ReplayOutcome",
    "ReplayPlan",
    "Scan",
    "add_arguments",
    "fill_latest",
    "filters_from",
    "format_age",
    "group_events",
    "identity",
    "plan_replay",
    "read_originals",
    "replay_destination",
    "run",
    "scan",
    "send_replays",
]
