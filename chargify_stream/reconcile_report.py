"""What one ``reconcile`` pass saw and did, and how it is shown (text or JSON)."""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from typing import Any

from chargify_stream.connect import endpoint_advice

__all__ = [
    "Report",
    "Webhook",
    "Window",
    "format_ids",
    "format_time",
    "parse_api_time",
    "print_report",
]

_EVENT_ID = re.compile(r"(?:^|&)payload\[event_id\]=(\d+)")


@dataclass(frozen=True, slots=True)
class Window:
    since: datetime
    until: datetime

    def contains(self, moment: datetime) -> bool:
        return self.since <= moment < self.until

    def api_dates(self) -> tuple[date, date]:
        """The ``since_date``/``until_date`` to ask for: a day wider on each side."""
        return (self.since - timedelta(days=1)).date(), (self.until + timedelta(days=1)).date()


@dataclass(frozen=True, slots=True)
class Webhook:
    """A webhook record of Chargify's log, as far as reconciling needs it."""

    id: int
    event: str
    created_at: datetime
    state: str  # successful, failed, pending (pending includes paused: not yet sent)
    event_id: int | None
    last_error: str | None
    sent_to: str | None  # last_sent_url: which endpoint it belongs to

    @classmethod
    def from_api(cls, record: dict[str, Any]) -> Webhook:
        if record.get("successful"):
            state = "successful"
        elif record.get("last_error") or record.get("last_error_at"):
            state = "failed"
        else:
            state = "pending"
        found = _EVENT_ID.search(str(record.get("body") or ""))
        return cls(
            id=int(record["id"]),
            event=str(record.get("event") or ""),
            created_at=parse_api_time(record["created_at"]),
            state=state,
            event_id=int(found.group(1)) if found else None,
            last_error=record.get("last_error"),
            sent_to=record.get("last_sent_url"),
        )

    def as_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "event": self.event,
            "status": self.state,
            "created_at": self.created_at.isoformat(),
            "last_error": self.last_error,
            "last_sent_url": self.sent_to,
        }


@dataclass
class Report:
    window: Window
    dry_run: bool
    endpoint_url: str | None = None  # this pipeline's endpoint
    other_endpoints: int = 0  # webhooks of the window sent to the site's other endpoints
    checked: int = 0
    by_state: dict[str, int] = field(default_factory=dict)
    received: int = 0
    missing: list[Webhook] = field(default_factory=list)
    replayed: list[int] = field(default_factory=list)
    waited: float | None = None
    still_missing: list[int] | None = None
    endpoints: list[dict[str, Any]] = field(default_factory=list)
    events_checked: int = 0
    events_without_webhook: list[dict[str, Any]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def advice(self) -> list[str]:
        return [a for a in map(endpoint_advice, self.endpoints) if a]

    @property
    def needs_attention(self) -> bool:
        return bool(
            (self.dry_run and self.missing)
            or self.still_missing
            or self.advice
            or self.events_without_webhook
        )

    def as_json(self) -> dict[str, Any]:
        return {
            "since": self.window.since.isoformat(),
            "until": self.window.until.isoformat(),
            "dry_run": self.dry_run,
            "endpoint_url": self.endpoint_url,
            "other_endpoints_webhooks": self.other_endpoints,
            "checked": self.checked,
            "by_status": self.by_state,
            "already_received": self.received,
            "missing": [w.as_json() for w in self.missing],
            "replay_requested": len(self.replayed),
            "replayed_ids": self.replayed,
            "waited_s": self.waited,
            "still_missing": self.still_missing,
            "endpoints": [
                {
                    "id": e.get("id"),
                    "url": e.get("url"),
                    "status": e.get("status"),
                    "advice": endpoint_advice(e),
                }
                for e in self.endpoints
            ],
            "events_checked": self.events_checked,
            "events_without_webhook": self.events_without_webhook,
            "notes": self.notes,
        }


def print_report(report: Report) -> None:
    w = report.window
    states = ", ".join(f"{n} {s}" for s, n in sorted(report.by_state.items())) or "none"
    print(
        f"window: {format_time(w.since)} .. {format_time(w.until)}"
        + ("  (dry run)" if report.dry_run else "")
    )
    print(f"endpoint: {report.endpoint_url or '(none: all webhooks of the site are checked)'}")
    print(f"checked: {report.checked} webhooks in Chargify's log ({states})")
    if report.other_endpoints:
        print(f"  (and {report.other_endpoints} sent to the site's other endpoints: left alone)")
    print(f"already received: {report.received}")
    print(f"missing: {len(report.missing)}")
    for webhook in report.missing:
        error = f"  last error: {webhook.last_error}" if webhook.last_error else ""
        print(
            f"  {webhook.id}  {webhook.event}  {webhook.state}  "
            f"{format_time(webhook.created_at)}{error}"
        )
    if report.dry_run:
        print(f"replay requested: 0 (dry run; would request {len(report.missing)})")
    else:
        print(f"replay requested: {len(report.replayed)}")
    if report.still_missing is not None:
        print(f"still missing after {report.waited}s: {len(report.still_missing)}")
        if report.still_missing:
            print(f"  {format_ids(report.still_missing)}")
    elif report.replayed:
        print("still missing: not checked (use --wait SECONDS to see the replays arrive)")
    enabled = sum(1 for e in report.endpoints if not endpoint_advice(e))
    print(f"endpoints: {len(report.endpoints)} ({enabled} enabled)")
    for advice in report.advice:
        print(f"  {advice}")
    print(
        f"events without a webhook: {len(report.events_without_webhook)} "
        f"(of {report.events_checked} events of the types the pipeline acts on)"
    )
    for event in report.events_without_webhook:
        print(
            f"  event {event['id']}  {event['key']}  subscription {event['subscription_id']}"
            f"  {event['created_at']}: Chargify made no webhook for it; replay cannot bring it"
        )
    for note in report.notes:
        print(f"note: {note}")


def parse_api_time(text: str) -> datetime:
    moment = datetime.fromisoformat(str(text))
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def format_time(moment: datetime | None) -> str:
    if moment is None:
        return "?"
    return moment.astimezone(UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def format_ids(ids: Iterable[int], limit: int = 20) -> str:
    items = list(ids)
    shown = ", ".join(map(str, items[:limit]))
    return shown + (f", ... ({len(items) - limit} more)" if len(items) > limit else "")
