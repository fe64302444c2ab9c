"""The real Kafka and Postgres that a test session runs against.

Two backends, chosen by ``CHARGIFY_TEST_BACKEND``:

- ``local`` (the default, and the only one that works without a Docker engine): Kafka
  from Maven Central jars and Postgres from Debian's binaries, started by this project
  (``chargify_stream.local``), on free loopback ports, with data in temp folders;
- ``testcontainers``: the same services as Docker containers, for a machine with a Docker
  engine. Fault tests that kill and restart a service run on the local backend only.
"""

from __future__ import annotations

import os
from typing import Any, Protocol

from chargify_stream.local.kafka import LocalKafka
from chargify_stream.local.postgres import LocalPostgres

BACKEND = os.environ.get("CHARGIFY_TEST_BACKEND", "local")


class KafkaService(Protocol):
    bootstrap_servers: str
    can_restart: bool

    def stop(self) -> None: ...
    def kill(self) -> None: ...
    def start(self) -> None: ...
    def close(self) -> None: ...


class PostgresService(Protocol):
    can_restart: bool

    def dsn(self, dbname: str = "postgres") -> str: ...
    def create_database(self, name: str) -> str: ...
    def stop(self) -> None: ...
    def kill(self) -> None: ...
    def start(self) -> None: ...
    def close(self) -> None: ...


class _LocalKafka:
    can_restart = True

    def __init__(self) -> None:
        self._k = LocalKafka()
        self._k.start()
        self.bootstrap_servers = self._k.bootstrap_servers

    def stop(self) -> None:
        self._k.stop()

    def kill(self) -> None:
        self._k.kill()

    def start(self) -> None:
        self._k.start()

    def close(self) -> None:
        self._k.cleanup()


class _LocalPostgres:
    can_restart = True

    def __init__(self) -> None:
        # fsync off: a test database need not survive a power cut, and it halves test time.
        self._p = LocalPostgres(settings={"fsync": "off", "full_page_writes": "off"})
        self._p.start()

    def dsn(self, dbname: str = "postgres") -> str:
        return self._p.dsn(dbname)

    def create_database(self, name: str) -> str:
        return self._p.create_database(name)

    def stop(self) -> None:
        self._p.stop()

    def kill(self) -> None:
        self._p.kill()

    def start(self) -> None:
        self._p.start()

    def close(self) -> None:
        self._p.cleanup()


class _ContainerKafka:  # pragma: no cover - needs a Docker engine
    can_restart = False

    def __init__(self) -> None:
        from testcontainers.kafka import KafkaContainer

        self._c: Any = KafkaContainer("confluentinc/cp-kafka:7.8.0").with_kraft()
        self._c.start()
        self.bootstrap_servers = self._c.get_bootstrap_server()

    def stop(self) -> None:
        raise NotImplementedError("restart tests need CHARGIFY_TEST_BACKEND=local")

    kill = start = stop

    def close(self) -> None:
        self._c.stop()


class _ContainerPostgres:  # pragma: no cover - needs a Docker engine
    can_restart = False

    def __init__(self) -> None:
        from testcontainers.postgres import PostgresContainer

        self._c: Any = PostgresContainer("postgres:16", driver=None)
        self._c.start()

    def dsn(self, dbname: str = "postgres") -> str:
        url: str = self._c.get_connection_url()
        return url.rsplit("/", 1)[0] + "/" + dbname

    def create_database(self, name: str) -> str:
        import psycopg

        with psycopg.connect(self.dsn(self._c.dbname), autocommit=True) as conn:
            conn.execute(f'create database "{name}"')
        return self.dsn(name)

    def stop(self) -> None:
        raise NotImplementedError("restart tests need CHARGIFY_TEST_BACKEND=local")

    kill = start = stop

    def close(self) -> None:
        self._c.stop()


def start_kafka() -> KafkaService:
    if BACKEND == "testcontainers":
        return _ContainerKafka()
    if BACKEND != "local":
        raise RuntimeError(
            f"CHARGIFY_TEST_BACKEND must be local or testcontainers, not {BACKEND!r}"
        )
    return _LocalKafka()


def start_postgres() -> PostgresService:
    if BACKEND == "testcontainers":
        return _ContainerPostgres()
    return _LocalPostgres()
