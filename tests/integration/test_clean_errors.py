"""Handled failures say what failed in one line: no traceback, no password."""

from __future__ import annotations

import pytest
from pydantic import SecretStr

from chargify_stream.base.settings import Settings
from chargify_stream.local.ports import free_port
from tests.stages import run_cli

pytestmark = pytest.mark.integration


def test_migrate_with_the_database_down_says_what_failed_without_a_traceback(
    settings: Settings,
) -> None:
    port = free_port()  # nothing listens there
    away = settings.model_copy(
        update={"database_url": SecretStr(f"postgresql://bob:s3cret-pw@127.0.0.1:{port}/ledger")}
    )
    done = run_cli(away, "migrate")
    assert done.returncode == 1
    assert done.stdout == ""
    [line] = done.stderr.strip().splitlines()
    assert line.startswith(f"chargify-stream: cannot reach Postgres at host 127.0.0.1 port {port}")
    assert "database ledger user bob" in line
    assert "Connection refused" in line
    assert "s3cret-pw" not in done.stderr
    assert "Traceback" not in done.stderr


def test_migrate_against_a_running_database_still_works(settings: Settings) -> None:
    done = run_cli(settings, "migrate")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "schema is up to date"
