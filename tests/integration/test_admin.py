"""``chargify-stream migrate`` and the admin commands, run as an operator runs them."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import psycopg
import pytest

from chargify_stream.base.settings import Settings
from chargify_stream.sink.migrate import available, migrate
from tests.stages import run_cli as cli

pytestmark = pytest.mark.integration


def ok(settings: Settings, *args: str) -> str:
    done = cli(settings, *args)
    assert done.returncode == 0, done.stderr
    return done.stdout


def query(dsn: str, sql: str) -> list[tuple[Any, ...]]:
    with psycopg.connect(dsn, autocommit=True) as conn:
        return conn.execute(sql.encode()).fetchall()


def test_migrate_is_versioned_idempotent_and_recorded(
    make_settings: Callable[..., Settings], database_factory: Callable[..., str]
) -> None:
    dsn = database_factory(migrated=False)
    settings = make_settings(database_url=dsn)
    names = [m.name for m in available()]

    assert ok(settings, "migrate").strip() == "applied: " + ", ".join(names)
    assert ok(settings, "migrate").strip() == "schema is up to date"
    assert query(dsn, "select version, name from schema_migrations order by version") == [
        (m.version, m.name) for m in available()
    ]
    indexes = {
        row[0]
        for row in query(dsn, "select indexdef from pg_indexes where tablename = 'transactions'")
    }
    for columns in ("(customer_key, occurred_at)", "(partner_key, occurred_at)", "(occurred_at)"):
        assert any(d.endswith(columns) for d in indexes), (columns, indexes)


def test_migration_0002_carries_0001_versions_over(database_factory: Callable[..., str]) -> None:
    dsn = database_factory(migrated=False)
    [first, second, *_] = available()
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(first.sql.encode())
        conn.execute(
            "create table schema_migrations (version integer primary key, name text not null,"
            " applied_at timestamptz not null default now())"
        )
        conn.execute("insert into schema_migrations values (1, %s)", (first.name,))
        conn.execute(
            "insert into partners values ('p'); insert into customers values ('c', 'p');"
            " insert into subscriptions (subscription_id, customer_key, state, components,"
            " component_versions, last_webhook_id, last_event_at) values (1, 'c', 'active',"
            ' \'{"7": 3}\', \'{"7": ["2024-10-11T19:28:31.000001+00:00", 42]}\', 43,'
            " '2024-10-11T19:30:00Z')"
        )

    assert second.name in migrate(dsn)
    assert query(dsn, "select component_versions, field_versions from subscriptions") == [
        ({"7": [1728674911000001, 42]}, {"state": [1728675000000000, 43]})
    ]


def test_a_migration_recorded_under_another_name_stops_migrate(settings: Settings) -> None:
    query(settings.database_dsn(), "update schema_migrations set name = '0002_other.sql'"
          " where version = 2 returning 1")  # fmt: skip
    done = cli(settings, "migrate")
    assert done.returncode == 1
    assert "migration 2 is recorded as '0002_other.sql'" in done.stderr


def test_partners_customers_and_plans_are_added_and_listed(settings: Settings) -> None:
    added = json.loads(ok(settings, "partners", "add", "acme", "--name", "Acme", "--json"))
    assert added["partner_key"] == "acme" and added["name"] == "Acme"
    ok(settings, "customers", "add", "cust-1", "--partner", "acme", "--email", "a@example.com",
       "--name", "Ada")  # fmt: skip
    ok(settings, "customers", "add", "cust-2")
    assert "added plan 3792003" in ok(settings, "plans", "add", "3792003", "--name", "Basic")

    customers = json.loads(ok(settings, "customers", "list", "--json"))
    assert [(c["customer_key"], c["partner_key"], c["email"], c["name"]) for c in customers] == [
        ("cust-1", "acme", "a@example.com", "Ada"),
        ("cust-2", None, None, None),
    ]
    assert all(c["created_at"].endswith("+00:00") for c in customers)
    plans = json.loads(ok(settings, "plans", "list", "--json"))
    assert [(p["plan_key"], p["name"]) for p in plans] == [("3792003", "Basic")]

    table = ok(settings, "partners", "list").splitlines()
    assert table[0].split() == ["PARTNER_KEY", "NAME", "CREATED_AT"]
    assert table[1].split()[:2] == ["acme", "Acme"]
    assert table[-1] == "(1 partners)"


def test_duplicates_and_unknown_partners_are_refused_clearly(settings: Settings) -> None:
    ok(settings, "partners", "add", "acme")
    ok(settings, "customers", "add", "cust-1", "--partner", "acme")
    ok(settings, "plans", "add", "77")

    for args, message in (
        (("partners", "add", "acme"), "partner 'acme' already exists"),
        (("customers", "add", "cust-1"), "customer 'cust-1' already exists"),
        (("plans", "add", "77"), "plan '77' already exists"),
        (("customers", "add", "cust-2", "--partner", "nobody"), "unknown partner 'nobody'"),
    ):
        done = cli(settings, *args)
        assert done.returncode == 1, args
        assert message in done.stderr, done.stderr
        assert "Traceback" not in done.stderr
    assert query(settings.database_dsn(), "select customer_key from customers") == [("cust-1",)]


@pytest.mark.parametrize(
    "args", [("plans", "add", "basic-plan"), ("partners", "add", ""), ("customers", "add", " c")]
)
def test_malformed_arguments_are_usage_errors(settings: Settings, args: tuple[str, ...]) -> None:
    done = cli(settings, *args)
    assert done.returncode == 2
    assert done.stderr.startswith("chargify-stream: ")


def test_admin_on_an_unmigrated_database_says_to_migrate(
    make_settings: Callable[..., Settings], database_factory: Callable[..., str]
) -> None:
    settings = make_settings(database_url=database_factory(migrated=False))
    done = cli(settings, "partners", "list")
    assert done.returncode == 1
    assert "run `chargify-stream migrate` first" in done.stderr
