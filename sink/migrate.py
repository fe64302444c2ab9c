"""Versioned, idempotent schema migrations, recorded in ``schema_migrations``.

Each ``sink/migrations/NNNN_name.sql`` file runs once, in order, inside one transaction
together with its row in ``schema_migrations``. An advisory lock serialises concurrent
``migrate`` runs (several sinks starting at once).
"""

from __future__ import annotations

import logging
from importlib import resources

import psycopg

log = logging.getLogger(__name__)

_LOCK_ID = 0x63686172  # any constant shared by every migrate run


def available() -> list[tuple[int, str, str]]:
    """(version, name, sql) of every migration shipped with the package, in order."""
    out = []
    for entry in resources.files("sink").joinpath("migrations").iterdir():
        if entry.name.endswith(".sql"):
            version = int(entry.name.split("_", 1)[0])
            out.append((version, entry.name, entry.read_text()))
    return sorted(out)


def migrate(dsn: str) -> list[str]:
    """Apply every pending migration; return the names applied (empty when up to date)."""
    applied: list[str] = []
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("select pg_advisory_lock(%s)", (_LOCK_ID,))
        try:
            conn.execute(
                "create table if not exists schema_migrations ("
                " version integer primary key, name text not null,"
                " applied_at timestamptz not null default now())"
            )
            done = {row[0] for row in conn.execute("select version from schema_migrations")}
            for version, name, sql in available():
                if version in done:
                    continue
                with conn.transaction():
                    conn.execute(sql.encode())
                    conn.execute(
                        "insert into schema_migrations (version, name) values (%s, %s)",
                        (version, name),
                    )
                log.info("applied migration %s", name)
                applied.append(name)
        finally:
            conn.execute("select pg_advisory_unlock(%s)", (_LOCK_ID,))
    return applied
