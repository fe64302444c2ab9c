"""Fixtures shared by every test.

Session-scoped real services (``kafka_service``, ``postgres_service``; see
``tests/services.py``), and per-test factories that give each test its own topics (a
unique prefix), consumer groups, Faust app id and database, so tests never see each
other's records.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest

from chargify_stream.base.kafka_admin import ensure_pipeline_topics, ensure_topics
from chargify_stream.base.settings import Settings, load_settings
from chargify_stream.local.kafka import LocalKafka, Scram
from chargify_stream.local.ports import free_port
from chargify_stream.sink.migrate import migrate
from tests.services import KafkaService, PostgresService, start_kafka, start_postgres
from tests.stages import Stage

TEST_SHARED_KEY = "test-shared-key"


@pytest.fixture(scope="session")
def kafka_service() -> Iterator[KafkaService]:
    service = start_kafka()
    yield service
    service.close()


@pytest.fixture(scope="session")
def sasl_kafka() -> Iterator[LocalKafka]:
    """A second broker, started only for the tests that ask for it: SASL_SSL only
    (SCRAM-SHA-512 over TLS with a throwaway CA), like a managed cluster."""
    kafka = LocalKafka(scram=Scram(users=(("chargify-test", "scram-test-secret"),)))
    kafka.start()
    yield kafka
    kafka.cleanup()


@pytest.fixture(scope="session")
def postgres_service() -> Iterator[PostgresService]:
    service = start_postgres()
    yield service
    service.close()


def unique(prefix: str) -> str:
    return f"{prefix}{uuid.uuid4().hex[:12]}"


@pytest.fixture
def topic_factory(kafka_service: KafkaService) -> Callable[..., str]:
    """Create a topic with a unique name and return the name."""

    def make(prefix: str = "t", partitions: int = 1) -> str:
        name = unique(f"{prefix}-")
        ensure_topics(kafka_service.bootstrap_servers, [name], partitions=partitions)
        return name

    return make


@pytest.fixture
def database_factory(postgres_service: PostgresService) -> Callable[..., str]:
    """Create a fresh, migrated database and return its DSN."""

    def make(migrated: bool = True) -> str:
        dsn = postgres_service.create_database(unique("t_"))
        if migrated:
            migrate(dsn)
        return dsn

    return make


@pytest.fixture
def make_settings(
    kafka_service: KafkaService,
    database_factory: Callable[..., str],
    tmp_path: Path,
) -> Callable[..., Settings]:
    """Settings for one test: unique topics (created), groups, app id and database."""

    def make(partitions: int = 1, **overrides: Any) -> Settings:
        values = settings_values(
            tmp_path,
            kafka_bootstrap_servers=kafka_service.bootstrap_servers,
            database_url=overrides.pop("database_url", None) or database_factory(),
            topic_partitions=partitions,
        )
        values.update(overrides)
        settings = load_settings(**values)
        ensure_pipeline_topics(settings, partitions=partitions)
        return settings

    return make


def settings_values(tmp_path: Path, **values: Any) -> dict[str, Any]:
    """One test's own names and ports (unique topics, groups, app id), plus ``values``."""
    tag = unique("")
    return {
        "chargify_shared_keys": TEST_SHARED_KEY,
        "kafka_topic_prefix": f"t{tag}.",
        "topic_partitions": 1,
        "processor_app_id": f"processor-{tag}",
        "sink_group_id": f"sink-{tag}",
        "gateway_port": free_port(),
        "processor_web_port": free_port(),
        "sink_metrics_port": free_port(),
        "processor_data_dir": str(tmp_path / f"processor-{tag}"),
        "sink_batch_timeout_ms": 50,
        **values,
    }


@pytest.fixture
def settings(make_settings: Callable[..., Settings]) -> Settings:
    return make_settings()


@pytest.fixture
def db(settings: Settings) -> Iterator[psycopg.Connection[Any]]:
    """An autocommit connection to the test's database."""
    with psycopg.connect(settings.database_dsn(), autocommit=True) as conn:
        yield conn


@pytest.fixture
def stages(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Callable[..., Stage]]:
    """Start ``chargify-stream <stage>`` processes; all are stopped at the end of the test."""
    started: list[Stage] = []

    def start(name: str, settings: Settings, *args: str) -> Stage:
        stage = Stage(name, settings, tmp_path, *args).start()
        started.append(stage)
        return stage

    yield start
    failed = getattr(request.node, "rep_call", None)
    for stage in started:
        if stage.running:
            stage.kill()
        if failed is not None and failed.failed:
            print(f"\n----- {stage.name} log -----\n{stage.log()[-6000:]}")


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Any:
    report = yield
    setattr(item, f"rep_{report.when}", report)
    return report
