"""Versioned, idempotent schema migrations, recorded in ``schema_migrations``.

Each ``sink/migrations/NNNN_name.sql`` file runs once, in version order, inside one
transaction together with its row in ``schema_migrations`` (so a failed migration leaves
nothing behind and runs again next time). An advisory lock serialises concurrent
``migrate`` runs (several sinks deployed at once). A version recorded under another file
name, or two files with one version, stop the run: that is two branches that numbered
their migrations alike, and applying either silently would leave the schema unknown.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from importlib import resources
from typing import Any

import psycopg
from psycopg.conninfo import conninfo_to_dict

from chargify_stream.base.errors import ChargifyStreamError, TransientError

log = logging.getLogger(__name__)

_LOCK_ID = 0x63686172  # any constant shared by every migrate run
_FILE_NAME = re.compile(r"^(\d{4})_[a-z0-9_]+\.sql$")

_CREATE_TABLE = (
    "create table if not exists schema_migrations ("
    " version integer primary key, name text not null,"
    " applied_at timestamptz not null default now())"
)


class MigrationError(ChargifyStreamError):
    """The shipped migrations and the database's record of them disagree."""


@dataclass(frozen=True, slots=True)
class Migration:
    version: int
    name: str
    sql: str


def available() -> list[Migration]:
    """Every migration shipped with the package, in version order."""
    found: dict[int, Migration] = {}
    for entry in resources.files("chargify_stream.sink").joinpath("migrations").iterdir():
        if not entry.name.endswith(".sql"):
            continue
        match = _FILE_NAME.match(entry.name)
        if match is None:
            raise MigrationError(f"migration file {entry.name!r} is not named NNNN_name.sql")
        version = int(match.group(1))
        if version in found:
            raise MigrationError(
                f"two migrations share version {version}: {found[version].name}, {entry.name}"
            )
        found[version] = Migration(version, entry.name, entry.read_text(encoding="utf-8"))
    return [found[v] for v in sorted(found)]


def applied(conn: psycopg.Connection[Any]) -> dict[int, str]:
    """version -> file name of every migration recorded in the database."""
    exists = conn.execute("select to_regclass('schema_migrations') is not null").fetchone()
    if exists is None or not exists[0]:
        return {}
    return {row[0]: row[1] for row in conn.execute("select version, name from schema_migrations")}


def pending(conn: psycopg.Connection[Any]) -> list[str]:
    """The names of shipped migrations not yet applied; raises on a conflicting record."""
    done = applied(conn)
    _check(done)
    return [m.name for m in available() if m.version not in done]


def _check(done: dict[int, str]) -> None:
    for m in available():
        if m.version in done and done[m.version] != m.name:
            raise MigrationError(
                f"migration {m.version} is recorded as {done[m.version]!r} but this build "
                f"ships {m.name!r}; renumber one of them"
            )


def migrate(dsn: str) -> list[str]:
    """Apply every pending migration; return the names applied (empty when up to date).

    Raises :class:`TransientError` when Postgres cannot be reached and
    :class:`MigrationError` when a migration fails (it is rolled back); both say what
    failed in one line, without the password.
    """
    try:
        return _migrate(dsn)
    except psycopg.OperationalError as exc:
        raise TransientError(
            f"cannot reach Postgres at {_where(dsn)}: {_one_line(exc)}; nothing more was migrated"
        ) from None
    except psycopg.Error as exc:
        state = f" (SQLSTATE {exc.sqlstate})" if exc.sqlstate else ""
        raise MigrationError(
            f"migrating the database at {_where(dsn)} failed{state}: {_one_line(exc)}"
        ) from None


def _migrate(dsn: str) -> list[str]:
    done_now: list[str] = []
    with psycopg.connect(dsn, autocommit=True, connect_timeout=10) as conn:
        conn.execute("select pg_advisory_lock(%s)", (_LOCK_ID,))
        try:
            conn.execute(_CREATE_TABLE)
            done = applied(conn)
            _check(done)
            for m in available():
                if m.version in done:
                    continue
                with conn.transaction():
                    conn.execute(m.sql.encode())
                    conn.execute(
                        "insert into schema_migrations (version, name) values (%s, %s)",
                        (m.version, m.name),
                    )
                log.info("applied migration %s", m.name)
                done_now.append(m.name)
        finally:
            if not conn.closed and not conn.broken:
                conn.execute("select pg_advisory_unlock(%s)", (_LOCK_ID,))
    return done_now


def _where(dsn: str) -> str:
    """``host 127.0.0.1 port 5433 database chargify``: where ``dsn`` points, no password."""
    try:
        parts = conninfo_to_dict(dsn)
    except psycopg.Error:
        return "DATABASE_URL"
    found = [f"{name} {parts[key]}" for key, name in _WHERE if parts.get(key)]
    return " ".join(found) or "the default libpq address"


_WHERE = (("host", "host"), ("port", "port"), ("dbname", "database"), ("user", "user"))


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())
