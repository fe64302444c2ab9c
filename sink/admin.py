"""``chargify-stream partners|customers|plans add|list``: the records events are matched to.

A customer's key is the Chargify customer ``reference``; a plan's key is the Chargify
product id. Creating a plan links every stored subscription on that product to it.

Errors: a duplicate key or a customer naming an unknown partner is an :class:`AdminError`
(exit 1); a malformed argument (an empty key, a plan key that is not a product id) is a
usage error (:class:`ConfigError`, exit 2). Every message says what to do next.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime
from typing import Any

import psycopg
from psycopg import errors
from psycopg.rows import dict_row

from chargify_stream.base.errors import ChargifyStreamError, ConfigError, TransientError
from chargify_stream.base.settings import Settings
from chargify_stream.sink.upsert import PLAN_LINK_LOCK

COLUMNS = {
    "partners": ("partner_key", "name", "created_at"),
    "customers": ("customer_key", "partner_key", "email", "name", "created_at"),
    "plans": ("plan_key", "name", "created_at"),
}
SINGULAR = {"partners": "partner", "customers": "customer", "plans": "plan"}


class AdminError(ChargifyStreamError):
    """An admin command could not do what was asked (duplicate key, unknown partner...)."""


def add_arguments(entity: str, parser: argparse.ArgumentParser) -> None:
    """The options of ``<entity> add`` (the key argument is added by the CLI)."""
    parser.add_argument("--name", help="display name")
    if entity == "customers":
        parser.add_argument("--partner", help="the partner key this customer is attributed to")
        parser.add_argument("--email", help="the customer's email")
    parser.add_argument("--json", action="store_true", help="print the created record as JSON")


def connect(settings: Settings) -> psycopg.Connection[dict[str, Any]]:
    """A connection returning rows as dicts; commits when its ``with`` block ends."""
    try:
        return psycopg.connect(settings.database_dsn(), row_factory=dict_row, connect_timeout=10)
    except psycopg.OperationalError as exc:
        raise TransientError(f"cannot connect to the database: {exc}".strip()) from exc


def add_partner(conn: psycopg.Connection[Any], key: str, name: str | None) -> dict[str, Any]:
    """Insert a partner; :class:`AdminError` if the key exists."""
    return _insert(conn, "partners", {"partner_key": _key(key, "partner"), "name": name})


def add_customer(
    conn: psycopg.Connection[Any],
    key: str,
    *,
    partner: str | None = None,
    email: str | None = None,
    name: str | None = None,
) -> dict[str, Any]:
    """Insert a customer; :class:`AdminError` if the key exists or the partner does not."""
    row = {
        "customer_key": _key(key, "customer"),
        "partner_key": partner,
        "email": email,
        "name": name,
    }
    return _insert(conn, "customers", row)


def add_plan(conn: psycopg.Connection[Any], key: str, name: str | None) -> dict[str, Any]:
    """Insert a plan and link the stored subscriptions on its product to it."""
    if not key.isascii() or not key.isdigit():
        raise ConfigError(f"plan key must be a Chargify product id (digits), not {key!r}")
    with conn.transaction():
        # Wait for sink batches in flight and hold new ones back until this commits: a
        # subscription written meanwhile would otherwise see no plan and miss this update.
        conn.execute("select pg_advisory_xact_lock(%s)", (PLAN_LINK_LOCK,))
        row = _insert(conn, "plans", {"plan_key": key, "name": name})
        linked = conn.execute(
            "update subscriptions set plan_key = %s, updated_at = now()"
            " where product_id = %s and plan_key is null",
            (key, int(key)),
        ).rowcount
    row["linked_subscriptions"] = linked
    return row


def _key(key: str, what: str) -> str:
    if not key or key != key.strip():
        raise ConfigError(f"{what} key must be non-empty, without surrounding spaces: {key!r}")
    return key


@contextmanager
def _schema_errors() -> Iterator[None]:
    """A database without the tables gets a message saying what to run."""
    try:
        yield
    except errors.UndefinedTable:
        raise AdminError(
            "the database has no such table: run `chargify-stream migrate` first"
        ) from None


def _insert(conn: psycopg.Connection[Any], table: str, row: dict[str, Any]) -> dict[str, Any]:
    cols = list(row)
    query = (
        f"insert into {table} ({', '.join(cols)}) values ({', '.join(['%s'] * len(cols))})"
        f" returning {', '.join(COLUMNS[table])}"
    )
    try:
        with _schema_errors(), conn.transaction():
            result = conn.cursor(row_factory=dict_row).execute(query.encode(), list(row.values()))
            created = result.fetchone()
    except errors.UniqueViolation:
        raise AdminError(f"{SINGULAR[table]} {row[cols[0]]!r} already exists") from None
    except errors.ForeignKeyViolation:
        raise AdminError(
            f"unknown partner {row.get('partner_key')!r}: add it first with `partners add`"
        ) from None
    assert created is not None
    return dict(created)


def list_rows(conn: psycopg.Connection[Any], table: str) -> list[dict[str, Any]]:
    """Every row of ``table``, ordered by key."""
    cols = COLUMNS[table]
    query = f"select {', '.join(cols)} from {table} order by {cols[0]}"
    with _schema_errors():
        return [dict(r) for r in conn.cursor(row_factory=dict_row).execute(query.encode())]


def run(entity: str, action: str, args: argparse.Namespace, settings: Settings) -> int:
    """The ``<entity> <action>`` command."""
    with connect(settings) as conn:
        if action == "list":
            _print(list_rows(conn, entity), entity, as_json=args.json)
            return 0
        if entity == "partners":
            row = add_partner(conn, args.key, args.name)
        elif entity == "customers":
            row = add_customer(
                conn, args.key, partner=args.partner, email=args.email, name=args.name
            )
        else:
            row = add_plan(conn, args.key, args.name)
    if args.json:
        print(json.dumps(_jsonable(row)))
    else:
        linked = row.get("linked_subscriptions")
        extra = f" (linked {linked} subscriptions)" if linked else ""
        print(f"added {SINGULAR[entity]} {args.key}{extra}")
    return 0


def _jsonable(row: dict[str, Any]) -> dict[str, Any]:
    return {k: v.isoformat() if isinstance(v, datetime) else v for k, v in row.items()}


def _print(rows: list[dict[str, Any]], entity: str, *, as_json: bool) -> None:
    if as_json:
        print(json.dumps([_jsonable(r) for r in rows], indent=2))
        return
    cols = COLUMNS[entity]
    table = [[("" if r[c] is None else str(r[c])) for c in cols] for r in rows]
    widths = [max([len(c), *(len(row[i]) for row in table)]) for i, c in enumerate(cols)]
    print("  ".join(c.upper().ljust(w) for c, w in zip(cols, widths, strict=True)).rstrip())
    for row in table:
        print("  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)).rstrip())
    print(f"({len(rows)} {entity})")
