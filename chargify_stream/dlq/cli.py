"""The ``dlq`` commands' arguments, and running them."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Mapping, Sequence
from dataclasses import replace
from datetime import UTC, datetime

from confluent_kafka import Producer

from chargify_stream.arguments import at_least_one, positive, time_arg
from chargify_stream.base.errors import ChargifyStreamError, ConfigError
from chargify_stream.base.kafka_admin import ensure_pipeline_topics
from chargify_stream.base.limits import deadletter_record_max
from chargify_stream.base.settings import Settings
from chargify_stream.dlq.events import DeadLetterEvent, Filters
from chargify_stream.dlq.replay import (
    DEFAULT_MAX_ATTEMPTS,
    ReplayOutcome,
    ReplayPlan,
    plan_replay,
    send_replays,
)
from chargify_stream.dlq.report import print_list, print_replay, print_stats, replay_summary
from chargify_stream.dlq.scan import Progress, Scan, fill_latest, kafka_config, read_originals, scan
from chargify_stream.resolved import Resolution, resolutions
from chargify_stream.schemas import headers as h
from chargify_stream.schemas.deadletter import format_timestamp


class ReplayError(ChargifyStreamError):
    """A replay did not complete; what was and was not published has been printed."""


def _reasons(text: str) -> list[str]:
    codes = [c.strip() for c in text.split(",") if c.strip()]
    unknown = [c for c in codes if c not in h.REASONS]
    if unknown or not codes:
        raise argparse.ArgumentTypeError(
            f"unknown reason code {', '.join(unknown) or repr(text)}; "
            f"expected one of {', '.join(h.REASONS)}"
        )
    return codes


_positive = positive()


def add_arguments(action: str, parser: argparse.ArgumentParser) -> None:
    """The filters every ``dlq`` command takes, plus ``replay``'s own options."""
    parser.add_argument(
        "--reason",
        type=_reasons,
        action="append",
        default=[],
        metavar="CODE",
        help=f"only this reason (repeat or comma-separate): {', '.join(h.REASONS)}",
    )
    parser.add_argument(
        "--event",
        action="append",
        default=[],
        metavar="TYPE",
        help="only this Chargify event type, e.g. payment_success (repeatable)",
    )
    parser.add_argument(
        "--customer",
        action="append",
        default=[],
        metavar="REFERENCE",
        help="only this customer reference (repeatable)",
    )
    parser.add_argument(
        "--since",
        type=time_arg,
        metavar="TIME",
        help="last dead-lettered at or after TIME: RFC 3339, a date, or an age (2h, 7d)",
    )
    parser.add_argument(
        "--until", type=time_arg, metavar="TIME", help="last dead-lettered before TIME"
    )
    parser.add_argument("--json", action="store_true", help="print JSON, for scripts")
    parser.add_argument(
        "--timeout",
        type=_positive,
        default=10.0,
        metavar="SECONDS",
        help="how long to wait for Kafka before giving up (default 10)",
    )
    if action == "replay":
        parser.epilog = (
            "Exit status: 0 every selected event was replayed (with --dry-run: would be); "
            "1 some were not acknowledged by the broker or not sent; 3 some were refused "
            "(resolved, failed too often, no dlq headers, ...) or none matched; 2 a usage "
            "error. A cron job can alert on anything but 0."
        )
        parser.add_argument(
            "--dry-run", action="store_true", help="print what would be replayed; change nothing"
        )
        parser.add_argument(
            "--include-resolved",
            action="store_true",
            help="replay events whose webhook a later delivery already recorded, found "
            "unchanged or ignored (webhook_outcomes); skipped by default",
        )
        parser.add_argument(
            "--rate", type=_positive, metavar="N", help="at most N records per second"
        )
        parser.add_argument(
            "--max-attempts",
            type=at_least_one,
            default=DEFAULT_MAX_ATTEMPTS,
            metavar="N",
            help="refuse events that already failed N times "
            f"(default {DEFAULT_MAX_ATTEMPTS}), so a poison record cannot loop",
        )


def filters_from(args: argparse.Namespace) -> Filters:
    """The :class:`Filters` of parsed arguments; ``ConfigError`` (exit 2) if contradictory."""
    if args.since is not None and args.until is not None and args.since >= args.until:
        raise ConfigError(
            f"--since ({format_timestamp(args.since)}) must be before "
            f"--until ({format_timestamp(args.until)})"
        )
    return Filters(
        reasons=frozenset(code for codes in args.reason for code in codes),
        events=frozenset(args.event),
        customers=frozenset(args.customer),
        since=args.since,
        until=args.until,
    )


def run(action: str, args: argparse.Namespace, settings: Settings) -> int:
    """Run ``dlq list``, ``dlq stats`` or ``dlq replay``; return the exit code."""
    selection = filters_from(args)
    now = datetime.now(UTC)
    found = scan(
        settings,
        timeout=args.timeout,
        progress=Progress(f"reading {settings.topic('deadletter')}"),
    )
    events = found.events
    chosen = [e for e in events if selection.matches(e)]
    resolved = _resolved(settings, chosen)
    if action == "list":
        print_list(found, events, chosen, selection, now, resolved, as_json=args.json)
        return 0
    if action == "stats":
        print_stats(found, events, chosen, now, resolved, as_json=args.json)
        return 0
    return _replay(settings, args, found, chosen, {} if args.include_resolved else resolved)


def _resolved(settings: Settings, chosen: Sequence[DeadLetterEvent]) -> dict[str, Resolution]:
    """The resolved ones among ``chosen`` (by webhook id); a note on stderr when unknown."""
    found = resolutions(
        settings, [(e.webhook_id, e.last_failed_at) for e in chosen if e.webhook_id]
    )
    if found is None:
        print(
            "chargify-stream: webhook_outcomes cannot be read: resolved events are not told "
            "apart (they are listed, and replayed, like the others)",
            file=sys.stderr,
        )
        return {}
    return found


def _replay(
    settings: Settings,
    args: argparse.Namespace,
    found: Scan,
    chosen: list[DeadLetterEvent],
    resolved: Mapping[str, Resolution],
) -> int:
    retry_topic = settings.topic("sink_retry")
    # The scan kept no values: events are planned and sent a batch at a time, each batch's
    # latest records read back whole first, and only their summaries kept afterwards.
    plan = ReplayPlan([], [])
    outcome = ReplayOutcome()
    producer: Producer | None = None
    for first in range(0, len(chosen), _REPLAY_BATCH):
        batch = chosen[first : first + _REPLAY_BATCH]
        if outcome.interrupted:
            plan.replay.extend(batch)
            outcome.not_sent.extend(batch)
            continue
        part = _plan_batch(settings, args, found, batch, resolved)
        if args.dry_run or not part.replay:
            sent = ReplayOutcome(acked=list(part.replay))
        else:
            if producer is None:
                producer = _producer(settings, args, found, retry_topic)
            sent = send_replays(
                part.replay,
                producer,
                sink_retry_topic=retry_topic,
                rate=args.rate,
                flush_timeout=max(args.timeout, 5) * 3 + 15,
            )
        _keep_summaries(part, sent, plan, outcome)
    summary = replay_summary(plan, outcome, retry_topic, dry_run=args.dry_run)
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        print_replay(summary)
    if outcome.failed or outcome.not_sent:
        print(
            f"chargify-stream: replay incomplete: {len(outcome.acked)} replayed, "
            f"{len(outcome.failed)} not acknowledged by the broker (they may or may not have "
            f"been published), {len(outcome.not_sent)} not sent. Replaying the same "
            "selection again is safe: every stage is idempotent.",
            file=sys.stderr,
        )
        return 130 if outcome.interrupted else 1
    if plan.refused or not plan.replay:
        return 3  # something refused, or nothing matched: see --help
    return 0


# How many events a replay reads back whole at a time: what bounds its memory.
_REPLAY_BATCH = 1000


def _plan_batch(
    settings: Settings,
    args: argparse.Namespace,
    found: Scan,
    batch: Sequence[DeadLetterEvent],
    resolved: Mapping[str, Resolution],
) -> ReplayPlan:
    """Read back the batch's latest records whole, then decide which may be replayed.

    Those without dlq headers, or resolved, are refused as they are (nothing is read).
    """
    retry_topic = settings.topic("sink_retry")
    wanted = [e for e in batch if e.info is not None and (e.webhook_id or "") not in resolved]
    whole = fill_latest(settings, wanted, timeout=args.timeout)
    filled = dict(zip((id(e) for e in wanted), whole, strict=True))
    return plan_replay(
        read_originals(settings, [filled.get(id(e), e) for e in batch], timeout=args.timeout),
        max_attempts=args.max_attempts,
        input_topics=[
            settings.topic(n) for n in ("raw", "transactions", "subscriptions", "sink_retry")
        ],
        sink_retry_topic=retry_topic,
        # The retry topic is created when missing (no sink has run since it exists).
        existing_topics=found.existing_topics | {retry_topic},
        resolved=resolved,
    )


def _producer(
    settings: Settings, args: argparse.Namespace, found: Scan, retry_topic: str
) -> Producer:
    if retry_topic not in found.existing_topics:
        ensure_pipeline_topics(settings, [retry_topic], timeout=args.timeout)
    errors: list[str] = []
    return Producer(
        {
            **kafka_config(settings, errors),
            "enable.idempotence": True,
            "acks": "all",
            "linger.ms": 5,
            # A record the broker has not taken by then is reported failed, so the
            # summary is final when flush() returns.
            "message.timeout.ms": int(max(args.timeout, 5) * 3000),
            "message.max.bytes": deadletter_record_max(settings.gateway_max_body_bytes),
        }
    )


def _keep_summaries(
    part: ReplayPlan, sent: ReplayOutcome, plan: ReplayPlan, outcome: ReplayOutcome
) -> None:
    """Add a batch's plan and outcome to the whole's, its events without their values."""
    light: dict[int, DeadLetterEvent] = {}

    def summary(event: DeadLetterEvent) -> DeadLetterEvent:
        if id(event) not in light:
            light[id(event)] = replace(event, latest=replace(event.latest, value=None))
        return light[id(event)]

    plan.replay.extend(summary(e) for e in part.replay)
    plan.refused.extend((summary(e), why) for e, why in part.refused)
    outcome.acked.extend(summary(e) for e in sent.acked)
    outcome.failed.extend((summary(e), why) for e, why in sent.failed)
    outcome.not_sent.extend(summary(e) for e in sent.not_sent)
    outcome.interrupted = outcome.interrupted or sent.interrupted
