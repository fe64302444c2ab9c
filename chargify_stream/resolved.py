"""Which dead-lettered webhooks are resolved: a later delivery of theirs reached an outcome.

A dead letter stays on its topic after a re-drive, a replay or a Chargify retry succeeded;
``webhook_outcomes`` knows. A webhook is resolved when its outcome is ``recorded``,
``unchanged`` or ``ignored``, decided no earlier than its latest dead letter: its effect
is in Postgres (or needs none), and replaying it again would only be a no-op. ``dlq``
shows such events as resolved and does not replay them unless asked
(``--include-resolved``).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from datetime import datetime
from typing import Any, Final

import psycopg

from chargify_stream.base.settings import Settings

__all__ = ["RESOLVING", "Resolution", "resolutions"]

log = logging.getLogger(__name__)

RESOLVING: Final = ("recorded", "unchanged", "ignored")

Resolution = tuple[str, datetime]  # (outcome, decided at)


def resolutions(
    settings: Settings, failed: Iterable[tuple[str, datetime | None]]
) -> dict[str, Resolution] | None:
    """webhook id -> (outcome, decided at) for each resolved one of ``failed`` (webhook id,
    latest dead-lettering time). ``None`` when the outcome log cannot be read (database
    away, not migrated): then nothing can be called resolved, and the caller says so."""
    latest: dict[int, datetime | None] = {}
    for webhook_id, failed_at in failed:
        if not webhook_id.isdigit() or int(webhook_id) >= 2**63:
            continue
        number = int(webhook_id)
        seen = latest.get(number)
        latest[number] = failed_at if seen is None or (failed_at and failed_at > seen) else seen
    if not latest:
        return {}
    try:
        with psycopg.connect(settings.database_dsn(), connect_timeout=5, autocommit=True) as conn:
            rows: list[Any] = conn.execute(
                "select webhook_id, outcome, decided_at from webhook_outcomes"
                " where webhook_id = any(%s) and outcome = any(%s)",
                (list(latest), list(RESOLVING)),
            ).fetchall()
    except psycopg.Error as exc:
        log.warning("cannot read webhook_outcomes (%s): no event is shown as resolved", exc)
        return None
    out: dict[str, Resolution] = {}
    for webhook_id, outcome, decided_at in rows:
        failed_at = latest[webhook_id]
        if failed_at is None or decided_at >= failed_at:
            out[str(webhook_id)] = (outcome, decided_at)
    return out
