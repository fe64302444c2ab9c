"""``chargify-stream tail TOPIC``: the decoded records of a topic, as JSON lines or a table.

Reads with :mod:`chargify_stream.analytics` (read_committed, no consumer group, nothing
committed). Without ``--follow`` it reads to the end the topic had when it started and
exits; with it, it keeps printing new records until interrupted. It starts at ``--since``,
else ``--from-beginning``, else the last ``-n`` records of each partition (10 by default).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterable, Sequence
from typing import Any, TextIO

from chargify_stream import analytics
from chargify_stream.arguments import at_least_one, positive, time_arg
from chargify_stream.base.settings import Settings

__all__ = ["add_arguments", "run"]

DEFAULT_LAST = 10

# The table's columns per topic: (heading, dict key, width when following).
_COLUMNS: dict[str, tuple[tuple[str, str, int], ...]] = {
    "transactions": (
        ("OCCURRED_AT", "occurred_at", 27),
        ("CUSTOMER", "customer", 16),
        ("KIND", "kind", 7),
        ("AMOUNT_CENTS", "amount_cents", 12),
        ("CURRENCY", "currency", 8),
        ("TRANSACTION_ID", "transaction_id", 14),
        ("SUBSCRIPTION_ID", "subscription_id", 15),
        ("WEBHOOK_ID", "webhook_id", 12),
    ),
    "subscriptions": (
        ("OCCURRED_AT", "occurred_at", 27),
        ("CUSTOMER", "customer", 16),
        ("SUBSCRIPTION_ID", "subscription_id", 15),
        ("EVENT", "event", 28),
        ("STATE", "state", 12),
        ("PRODUCT_ID", "product_id", 10),
        ("COMPONENTS", "components", 10),
        ("WEBHOOK_ID", "webhook_id", 12),
    ),
    "customers": (
        ("UPDATED_AT", "updated_at", 27),
        ("CUSTOMER_KEY", "customer_key", 16),
        ("PARTNER_KEY", "partner_key", 16),
        ("EMAIL", "email", 24),
        ("NAME", "name", 20),
    ),
    "deadletter": (
        ("FAILED_AT", "failed_at", 27),
        ("REASON", "reason", 26),
        ("STAGE", "stage", 9),
        ("EVENT", "event", 24),
        ("WEBHOOK_ID", "webhook_id", 12),
        ("CUSTOMER", "customer", 16),
        ("REPLAYS", "replay_count", 7),
        ("ERROR", "error", 50),
    ),
    "raw": (
        ("RECEIVED_AT", "received_at", 24),
        ("EVENT", "event", 28),
        ("WEBHOOK_ID", "webhook_id", 12),
        ("KEY", "key", 12),
        ("CUSTOMER", "customer", 16),
        ("BYTES", "body", 7),
    ),
}
_NUMERIC = {"amount_cents", "transaction_id", "subscription_id", "webhook_id", "product_id"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """``tail``'s arguments."""
    parser.add_argument("topic", choices=analytics.TOPICS, help="which topic to read")
    parser.add_argument("--json", action="store_true", help="one JSON object per line")
    parser.add_argument(
        "--follow", "-f", action="store_true", help="keep printing new records (Ctrl-C stops)"
    )
    start = parser.add_mutually_exclusive_group()
    start.add_argument(
        "--from-beginning", action="store_true", help="start at the oldest record kept"
    )
    start.add_argument(
        "--since",
        type=time_arg,
        metavar="TIME",
        help="start at the first record written at or after TIME: RFC 3339, a date, "
        "or an age (90s, 2h, 7d)",
    )
    start.add_argument(
        "-n",
        "--last",
        type=at_least_one,
        metavar="N",
        help=f"start N records before the end of each partition (default {DEFAULT_LAST})",
    )
    parser.add_argument(
        "--customer",
        metavar="REFERENCE",
        help="only this customer's records (the customer reference = customer_key)",
    )
    parser.add_argument(
        "--timeout",
        type=positive("a number of seconds"),
        default=30.0,
        metavar="SECONDS",
        help="how long Kafka may stay silent before giving up (default 30)",
    )


def run(args: argparse.Namespace, settings: Settings, out: TextIO | None = None) -> int:
    """Print the records ``args`` select; return the exit code."""
    stream = out or sys.stdout
    last = args.last
    if last is None and not args.from_beginning and args.since is None:
        last = DEFAULT_LAST
    records = analytics.read(
        args.topic,
        settings,
        from_beginning=args.from_beginning,
        since=args.since,
        last=last,
        customer=args.customer,
        follow=args.follow,
        timeout=args.timeout,
    )
    if args.json:
        for record in records:
            stream.write(json.dumps(record, ensure_ascii=False) + "\n")
            if args.follow:
                stream.flush()
    elif args.follow:
        _stream_table(args.topic, records, stream)
    else:
        rows = [_cells(args.topic, record) for record in records]
        stream.write(_table(args.topic, rows))
    stream.flush()
    return 0


def _cell(key: str, value: Any) -> str:
    if value is None:
        return "-"
    if key == "components":
        return str(len(value))
    if key == "body":
        return str(len(value.encode()))
    return str(value)


def _cells(topic: str, record: dict[str, Any]) -> list[str]:
    cells = [_cell(key, record.get(key)) for _, key, _ in _COLUMNS[topic]]
    if topic == "customers" and record.get("deleted"):
        cells[2:] = ["(deleted)"] + ["-"] * (len(cells) - 3)
    return cells


def _line(topic: str, cells: Sequence[str], widths: Sequence[int]) -> str:
    parts = []
    for (_, key, _), cell, width in zip(_COLUMNS[topic], cells, widths, strict=True):
        if len(cell) > width:
            cell = cell[: width - 1] + "…"
        parts.append(cell.rjust(width) if key in _NUMERIC else cell.ljust(width))
    return "  ".join(parts).rstrip()


def _table(topic: str, rows: Sequence[Sequence[str]]) -> str:
    """All rows, each column as wide as its widest cell (the error column at most 60)."""
    headings = [heading for heading, _, _ in _COLUMNS[topic]]
    widths = [
        min(max([len(heading)] + [len(row[i]) for row in rows]), 60)
        for i, heading in enumerate(headings)
    ]
    lines = [_line(topic, headings, widths)] + [_line(topic, row, widths) for row in rows]
    lines.append(f"({len(rows)} record{'s' if len(rows) != 1 else ''})")
    return "\n".join(lines) + "\n"


def _stream_table(topic: str, records: Iterable[dict[str, Any]], stream: TextIO) -> None:
    """Rows as they arrive, in fixed widths (the rows to come are not known yet)."""
    widths = [max(len(heading), width) for heading, _, width in _COLUMNS[topic]]
    stream.write(_line(topic, [heading for heading, _, _ in _COLUMNS[topic]], widths) + "\n")
    stream.flush()
    for record in records:
        stream.write(_line(topic, _cells(topic, record), widths) + "\n")
        stream.flush()
