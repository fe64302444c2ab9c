"""docker-compose.yml stays valid and runs the commands this build has.

There is no Docker engine on the machines the tests run on; ``docker-compose config``
validates the file without one (``scripts/install`` installs Debian's docker-compose).
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from chargify_stream.cli import build_parser

ROOT = Path(__file__).resolve().parents[2]


def compose_config() -> dict[str, Any]:
    exe = shutil.which("docker-compose")
    if exe is None:
        pytest.skip("docker-compose is not installed (scripts/install installs it)")
    env = {**os.environ, "CHARGIFY_SHARED_KEYS": "k", "POSTGRES_PASSWORD": "p"}
    proc = subprocess.run(
        [exe, "-f", str(ROOT / "docker-compose.yml"), "config"],
        capture_output=True,
        text=True,
        env=env,
        check=False,
        cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr
    loaded: dict[str, Any] = yaml.safe_load(proc.stdout)
    return loaded


def test_compose_file_is_valid_and_names_real_commands() -> None:
    config = compose_config()
    services = config["services"]
    assert {"kafka", "postgres", "migrate", "gateway", "processor", "sink"} <= set(services)
    commands = build_parser()._subparsers._group_actions[0].choices  # type: ignore[union-attr]
    for name in ("migrate", "gateway", "processor", "sink"):
        command = services[name]["command"]
        assert command[0] in commands, f"{name} runs unknown command {command}"
        env = services[name]["environment"]
        assert env["KAFKA_BOOTSTRAP_SERVERS"] == "kafka:9092"
        assert env["DATABASE_URL"].startswith("postgresql://")


def test_compose_requires_secrets_from_the_environment() -> None:
    exe = shutil.which("docker-compose")
    if exe is None:
        pytest.skip("docker-compose is not installed (scripts/install installs it)")
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("CHARGIFY_SHARED_KEYS", "POSTGRES_PASSWORD")
    }
    proc = subprocess.run(
        [exe, "-f", str(ROOT / "docker-compose.yml"), "config"],
        capture_output=True,
        text=True,
        env=env,
        check=False,
        cwd=ROOT,
    )
    assert proc.returncode != 0
    assert "POSTGRES_PASSWORD" in proc.stderr or "CHARGIFY_SHARED_KEYS" in proc.stderr
