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


def compose_config(*overrides: str) -> dict[str, Any]:
    exe = shutil.which("docker-compose")
    if exe is None:
        pytest.skip("docker-compose is not installed (scripts/install installs it)")
    env = {**os.environ, "CHARGIFY_SHARED_KEYS": "k", "POSTGRES_PASSWORD": "p"}
    files = [arg for name in ("docker-compose.yml", *overrides) for arg in ("-f", str(ROOT / name))]
    proc = subprocess.run(
        [exe, *files, "config"],
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


def test_the_cluster_override_runs_three_brokers_and_replicates_every_topic_three_times() -> None:
    config = compose_config("docker-compose.cluster.yml")
    services = config["services"]
    brokers = ("kafka", "kafka-2", "kafka-3")
    assert set(brokers) <= set(services)
    voters = "1@kafka:9093,2@kafka-2:9093,3@kafka-3:9093"
    for node_id, name in enumerate(brokers, start=1):
        env = services[name]["environment"]
        assert env["KAFKA_NODE_ID"] == str(node_id)
        assert env["KAFKA_CONTROLLER_QUORUM_VOTERS"] == voters
        assert env["KAFKA_ADVERTISED_LISTENERS"] == f"PLAINTEXT://{name}:9092"
        assert env["KAFKA_MIN_INSYNC_REPLICAS"] == "2"
        assert env["KAFKA_OFFSETS_TOPIC_REPLICATION_FACTOR"] == "3"
        assert env["CLUSTER_ID"] == services["kafka"]["environment"]["CLUSTER_ID"]
    assert len({services[n]["volumes"][0].split(":")[0] for n in brokers}) == 3
    for name in ("gateway", "processor", "sink"):
        env = services[name]["environment"]
        assert env["KAFKA_BOOTSTRAP_SERVERS"] == "kafka:9092,kafka-2:9092,kafka-3:9092"
        assert env["TOPIC_REPLICATION_FACTOR"] == "3"
        assert set(brokers) <= set(services[name]["depends_on"])
        assert env["DATABASE_URL"].startswith("postgresql://")  # the base file's stays


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
