"""``chargify-stream partners|customers|plans add|list``: the records events are matched to.

A customer's key is the Chargify customer ``reference``; a plan's key is the Chargify
product id. Creating a plan links every stored subscription on that product to it.
"""

from __future__ import annotations

import argparse
import json
import sys
from datetime import datetime
from typing import Any

import psycopg
from psycopg import errors
from psycopg.rows import dict_row

from chargify_stream.errors import ChargifyStreamError, ConfigError, TransientError
from chargify_stream.settings import Settings

COLUMNS = {
    "partners": ("partner_key", "name", "created_at"),
    "customers": ("customer_key", "partner_key", "email", "name", "created_at"),
    "plans": ("plan_key", "name", "created_at"),
}


class AdminError(ChargifyStreamError):
    """An admin command could not do what was asked (duplicate key, unknown partner...)."""


def add_arguments(entity: str, parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--name", help="display name")
    if entity == "customers":
        parser.add_argument("--partner", help="the partner key this customer is attributed to")
        parser.add_argument("--email", help="the customer's email")
    parser.add_argument("--json", action="store_true", help="print the created record as JSON")


def connect(settings: Settings) -> psycopg.Connection[dict[str, Any]]:
    try:
        return psycopg.connect(settings.database_dsn(), row_factory=dict_row, connect_timeout=10)
    except psycopg.OperationalError as exc:
        raise TransientError(f"cannot connect to the database: {exc}".strip()) from exc


def add_partner(conn: psycopg.Connection[Any], key: str, name: str | None) -> dict[str, Any]:
    return _insert(conn, "partners", {"partner_key": key, "name": name})


def add_customer(
    conn: psycopg.Connection[Any],
    key: str,
    *,
    partner: str | None = None,
    email: str | None = None,
    name: str | None = None,
) -> dict[str, Any]:
    if partner is not None:
        found = conn.execute("select 1 from partners where partner_key = %s", (partner,)).fetchone()
        if found is None:
            raise AdminError(f"unknown partner {partner!r}: add it first with `partners add`")
    row = {"customer_key": key, "partner_key": partner, "email": email, "name": name}
    return _insert(conn, "customers", row)


def add_plan(conn: psycopg.Connection[Any], key: str, name: str | None) -> dict[str, Any]:
    if not key.isdigit():
        raise ConfigError(f"plan key must be a Chargify product id (digits), not {key!r}")
    with conn.transaction():
        row = _insert(conn, "plans", {"plan_key": key, "name": name})
        conn.execute(
            "update subscriptions set plan_key = %s where product_id = %s and plan_key is null",
            (key, int(key)),
        )
    return row


def _insert(conn: psycopg.Connection[Any], table: str, row: dict[str, Any]) -> dict[str, Any]:
    cols = list(row)
    query = (
        f"insert into {table} ({', '.join(cols)}) values ({', '.join(['%s'] * len(cols))})"
        f" returning {', '.join(COLUMNS[table])}"
    )
    try:
        with conn.transaction():
            result = conn.execute(query.encode(), list(row.values())).fetchone()
    except errors.UniqueViolation:
        raise AdminError(f"{table[:-1]} {row[cols[0]]!r} already exists") from None
    assert result is not None
    return dict(result)


def list_rows(conn: psycopg.Connection[Any], table: str) -> list[dict[str, Any]]:
    cols = COLUMNS[table]
    query = f"select {', '.join(cols)} from {table} order by {cols[0]}"
    return [dict(r) for r in conn.execute(query.encode())]


def run(entity: str, action: str, args: argparse.Namespace, settings: Settings) -> int:
    with connect(settings) as conn:
        if action == "list":
            rows = list_rows(conn, entity)
            _print(rows, entity, as_json=args.json)
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
        print(f"added {entity[:-1]} {args.key}", file=sys.stderr)
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
    print("  ".join(c.upper().ljust(w) for c, w in zip(cols, widths, strict=True)))
    for row in table:
        print("  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)))
    print(f"({len(rows)} {entity})")
