"""What ``dlq list``, ``dlq stats`` and ``dlq replay`` print: tables, or JSON for scripts."""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime
from typing import Any, cast

from chargify_stream.dlq.events import (
    NO_HEADERS,
    DeadLetterEvent,
    Filters,
    rounded,
    text,
    time_text,
)
from chargify_stream.dlq.replay import ReplayOutcome, ReplayPlan, replay_destination
from chargify_stream.dlq.scan import Scan
from chargify_stream.resolved import Resolution

_ERROR_COLUMN = 60


def format_age(seconds: float | None) -> str:
    """``45s``, ``12m``, ``3h 4m``, ``2d 5h``: precise enough to read at a glance."""
    if seconds is None:
        return "-"
    s = int(seconds)
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m"
    if s < 86400:
        return f"{s // 3600}h {s % 3600 // 60}m"
    return f"{s // 86400}d {s % 86400 // 3600}h"


def _table(headers: Sequence[str], rows: Sequence[Sequence[str]], right: Iterable[int] = ()) -> str:
    aligned = set(right)
    widths = [max([len(c), *(len(r[i]) for r in rows)]) for i, c in enumerate(headers)]

    def line(cells: Sequence[str]) -> str:
        parts = [
            cell.rjust(w) if i in aligned else cell.ljust(w)
            for i, (cell, w) in enumerate(zip(cells, widths, strict=True))
        ]
        return "  ".join(parts).rstrip()

    return "\n".join([line(headers), *(line(r) for r in rows)])


def _short(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 3] + "..."


def print_list(
    found: Scan,
    events: list[DeadLetterEvent],
    chosen: list[DeadLetterEvent],
    selection: Filters,
    now: datetime,
    resolved: Mapping[str, Resolution],
    *,
    as_json: bool,
) -> None:
    if as_json:
        _print_json_list(_with_resolution(e, now, resolved) for e in chosen)
        return
    rows = []
    for e in chosen:
        info = e.info
        rows.append(
            [
                format_age(e.age(now)),
                time_text(e.last_failed_at) or "-",
                e.reason or NO_HEADERS,
                e.stage or "-",
                str(e.attempts),
                e.event or "-",
                e.customer or "-",
                e.webhook_id or "-",
                f"{info.source_topic}[{info.source_partition}]@{info.source_offset}"
                + (" (pointer)" if info.pointer else "")
                if info
                else e.latest.position,
                _short(info.error if info else "", _ERROR_COLUMN) or "-",
                resolved.get(e.webhook_id or "", ("-",))[0],
            ]
        )
    if rows:
        print(
            _table(
                [
                    "AGE",
                    "LAST FAILED",
                    "REASON",
                    "STAGE",
                    "ATTEMPTS",
                    "EVENT",
                    "CUSTOMER",
                    "WEBHOOK",
                    "SOURCE",
                    "ERROR",
                    "RESOLVED",
                ],
                rows,
                right=[4],
            )
        )
    bare = sum(1 for e in chosen if e.info is None)
    matched = f"{len(chosen)} of {len(events)}" if selection.active else f"{len(chosen)}"
    note = f"; {bare} without dlq-* headers, never replayed" if bare else ""
    done = sum(1 for e in chosen if e.webhook_id in resolved)
    if done:
        note += f"; {done} resolved by a later delivery, not replayed unless asked"
    pointers = sum(1 for e in chosen if e.info is not None and e.info.pointer)
    if pointers:
        note += (
            f"; {pointers} written as pointers: their bodies stay on their source topic,"
            " where replay reads them"
        )
    print(
        f"({matched} dead-lettered events; {found.records_read} records read from "
        f"{found.topic}{note})"
    )


def _stats(
    found: Scan,
    events: list[DeadLetterEvent],
    chosen: list[DeadLetterEvent],
    now: datetime,
    resolved: Mapping[str, Resolution],
) -> dict[str, Any]:
    by_reason: dict[str, dict[str, int]] = {}
    by_stage: dict[str, dict[str, int]] = {}
    for e in chosen:
        by_reason.setdefault(e.reason or NO_HEADERS, {"events": 0, "records": 0})["events"] += 1
        by_stage.setdefault(e.stage or NO_HEADERS, {"events": 0, "records": 0})["events"] += 1
        for reason, stage in e.records:
            by_reason.setdefault(reason, {"events": 0, "records": 0})["records"] += 1
            by_stage.setdefault(stage, {"events": 0, "records": 0})["records"] += 1
    oldest = min(
        (e for e in chosen if e.first_failed_at is not None),
        key=lambda e: cast(datetime, e.first_failed_at),
        default=None,
    )
    return {
        "topic": found.topic,
        "records_read": found.records_read,
        "events_total": len(events),
        "events": len(chosen),
        "records": sum(len(e.records) for e in chosen),
        "without_dlq_headers": sum(1 for e in chosen if e.info is None),
        "resolved": sum(1 for e in chosen if e.webhook_id in resolved),
        "pointers": sum(1 for e in chosen if e.info is not None and e.info.pointer),
        "by_reason": dict(sorted(by_reason.items())),
        "by_stage": dict(sorted(by_stage.items())),
        "oldest_failed_at": time_text(oldest.first_failed_at) if oldest else None,
        "oldest_age_seconds": rounded(oldest.age(now)) if oldest else None,
    }


def _print_json_list(items: Iterable[dict[str, Any]]) -> None:
    """A JSON array, one item a line, printed an item at a time (a list of every event as
    dicts would outweigh the events themselves, and ``indent`` would triple the time)."""
    first = True
    for item in items:
        print(f"[\n{json.dumps(item)}" if first else f",\n{json.dumps(item)}", end="")
        first = False
    print("[]" if first else "\n]")


def _with_resolution(
    event: DeadLetterEvent, now: datetime, resolved: Mapping[str, Resolution]
) -> dict[str, Any]:
    out = event.as_json(now)
    found = resolved.get(event.webhook_id or "")
    out["resolved"] = {"outcome": found[0], "at": time_text(found[1])} if found else None
    return out


def print_stats(
    found: Scan,
    events: list[DeadLetterEvent],
    chosen: list[DeadLetterEvent],
    now: datetime,
    resolved: Mapping[str, Resolution],
    *,
    as_json: bool,
) -> None:
    stats = _stats(found, events, chosen, now, resolved)
    if as_json:
        print(json.dumps(stats, indent=2))
        return
    scope = (
        f"{stats['events']} of {stats['events_total']}"
        if stats["events"] != stats["events_total"]
        else str(stats["events"])
    )
    print(
        f"{found.topic}: {scope} dead-lettered events, {stats['records']} records "
        f"({stats['records_read']} read; {stats['without_dlq_headers']} without dlq-* headers;"
        f" {stats['resolved']} resolved by a later delivery)"
    )
    if stats["oldest_failed_at"]:
        print(
            f"oldest: {format_age(stats['oldest_age_seconds'])} "
            f"(first dead-lettered {stats['oldest_failed_at']})"
        )
    for title, counts in (("REASON", stats["by_reason"]), ("STAGE", stats["by_stage"])):
        if counts:
            print()
            rows = [[k, str(v["events"]), str(v["records"])] for k, v in counts.items()]
            print(_table([title, "EVENTS", "RECORDS"], rows, right=[1, 2]))


def replay_summary(
    plan: ReplayPlan, outcome: ReplayOutcome, retry_topic: str, *, dry_run: bool
) -> dict[str, Any]:
    lines: list[dict[str, Any]] = []
    failed = dict((id(e), why) for e, why in outcome.failed)
    not_sent = {id(e) for e in outcome.not_sent}
    for e in plan.replay:
        if id(e) in failed:
            action, why = "failed", failed[id(e)]
        elif id(e) in not_sent:
            action, why = "not_sent", "interrupted before sending"
        else:
            action, why = ("would_replay" if dry_run else "replayed"), None
        lines.append(_replay_line(e, action, why, retry_topic))
    lines.extend(_replay_line(e, "refused", why, retry_topic) for e, why in plan.refused)
    per_reason: dict[str, Counter[str]] = {}
    for line in lines:
        per_reason.setdefault(line["reason"] or NO_HEADERS, Counter())[line["action"]] += 1
    return {
        "dry_run": dry_run,
        "selected": len(lines),
        "replayed": 0 if dry_run else len(outcome.acked),
        "would_replay": len(plan.replay) if dry_run else 0,
        "refused": len(plan.refused),
        "failed": len(outcome.failed),
        "not_sent": len(outcome.not_sent),
        "by_reason": {
            reason: {
                "selected": sum(c.values()),
                "replayed": c["replayed"],
                "would_replay": c["would_replay"],
                "refused": c["refused"],
                "failed": c["failed"] + c["not_sent"],
            }
            for reason, c in sorted(per_reason.items())
        },
        "records": lines,
    }


def _replay_line(
    event: DeadLetterEvent, action: str, why: str | None, retry_topic: str
) -> dict[str, Any]:
    info = event.info
    to_topic, to_partition = replay_destination(info, retry_topic) if info else (None, None)
    return {
        "action": action,
        "why": why,
        "identity": event.identity,
        "reason": event.reason,
        "event": event.event,
        "customer": event.customer,
        "webhook_id": event.webhook_id,
        "key": text(event.latest.key),
        "dead_letter": event.latest.position,
        "to_topic": to_topic,
        "to_partition": to_partition,
        "replay_count": info.replay_count if info else None,
        "new_replay_count": info.replay_count + 1 if info else None,
    }


def print_replay(summary: dict[str, Any]) -> None:
    verbs = {
        "would_replay": "would replay",
        "replayed": "replayed",
        "refused": "REFUSED",
        "failed": "FAILED",
        "not_sent": "NOT SENT",
    }
    for line in summary["records"]:
        what = (
            f"{line['identity']} ({line['reason'] or NO_HEADERS}, {line['event'] or '-'}, "
            f"customer {line['customer'] or '-'}) from {line['dead_letter']}"
        )
        if line["action"] in ("would_replay", "replayed"):
            partition = "" if line["to_partition"] is None else f"[{line['to_partition']}]"
            what += (
                f" -> {line['to_topic']}{partition} key {line['key']!r}"
                f" dlq-replay-count {line['new_replay_count']}"
            )
        if line["why"]:
            what += f": {line['why']}"
        print(f"{verbs[line['action']]:<12}  {what}")
    if summary["records"]:
        print()
    done = "would replay" if summary["dry_run"] else "replayed"
    count = summary["would_replay"] if summary["dry_run"] else summary["replayed"]
    head = f"selected {summary['selected']}, {done} {count}, refused {summary['refused']}"
    if summary["failed"] or summary["not_sent"]:
        head += f", failed {summary['failed'] + summary['not_sent']}"
    if summary["dry_run"]:
        head += " (dry run: nothing was published)"
    print(head)
    if summary["by_reason"]:
        key = "would_replay" if summary["dry_run"] else "replayed"
        rows = [
            [r, str(v["selected"]), str(v[key]), str(v["refused"]), str(v["failed"])]
            for r, v in summary["by_reason"].items()
        ]
        print(
            _table(
                ["REASON", "SELECTED", done.upper(), "REFUSED", "FAILED"], rows, right=[1, 2, 3, 4]
            )
        )
