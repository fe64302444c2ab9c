"""A real single-node Apache Kafka (KRaft mode) run from Maven Central jars.

There is no Docker engine on the machines this project is developed and tested on, so the
broker is fetched with Maven (``org.apache.kafka:kafka_2.13`` and its runtime dependencies)
into a cache outside the work tree, and run with ``java``. The cache is keyed by version, so
a second run, or a fresh clone on the same machine, starts offline.

Kafka 4.x's Maven artifacts declare log4j but no slf4j binding: without
``log4j-slf4j-impl`` a broker that dies at start prints nothing. We add it at the version
of log4j-core that Kafka pulls in, and a console log4j2 config.
"""

from __future__ import annotations

import base64
import contextlib
import logging
import os
import shutil
import signal
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

from chargify_stream.errors import ServiceError
from chargify_stream.local.ports import free_port

log = logging.getLogger(__name__)

KAFKA_VERSION = "4.1.1"
LOG4J_VERSION = "2.24.3"  # the log4j-core version kafka_2.13 4.1.1 depends on

_POM = """<project xmlns="http://maven.apache.org/POM/4.0.0">
  <modelVersion>4.0.0</modelVersion>
  <groupId>local.chargify-stream</groupId><artifactId>kafka-broker</artifactId>
  <version>1</version><packaging>pom</packaging>
  <dependencies>
    <dependency><groupId>org.apache.kafka</groupId><artifactId>kafka_2.13</artifactId>
      <version>{kafka}</version></dependency>
    <dependency><groupId>org.apache.logging.log4j</groupId>
      <artifactId>log4j-slf4j-impl</artifactId><version>{log4j}</version></dependency>
  </dependencies>
</project>
"""


def cache_dir() -> Path:
    """Where fetched jars live: ``$CHARGIFY_STREAM_CACHE`` or ``~/.cache/chargify-stream``."""
    base = os.environ.get("CHARGIFY_STREAM_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "chargify-stream"
    )
    return Path(base)


def ensure_kafka_jars(version: str = KAFKA_VERSION) -> Path:
    """Fetch the broker's jars once; return the folder to put on the classpath."""
    root = cache_dir() / f"kafka-{version}"
    lib = root / "lib"
    marker = root / ".complete"
    if marker.exists():
        return lib
    if shutil.which("mvn") is None:
        raise ServiceError("Maven (mvn) is needed to fetch the Kafka broker; run scripts/install")
    root.mkdir(parents=True, exist_ok=True)
    (root / "pom.xml").write_text(_POM.format(kafka=version, log4j=LOG4J_VERSION))
    if lib.exists():
        shutil.rmtree(lib)
    log.info("fetching Apache Kafka %s from Maven Central into %s", version, lib)
    cmd = [
        "mvn",
        "-B",
        "-q",
        f"-Dmaven.repo.local={cache_dir() / 'm2'}",
        "-f",
        str(root / "pom.xml"),
        "dependency:copy-dependencies",
        "-DincludeScope=runtime",
        f"-DoutputDirectory={lib}",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise ServiceError(
            f"fetching Kafka jars failed:\n{proc.stdout[-3000:]}{proc.stderr[-3000:]}"
        )
    if not any(lib.glob("kafka_2.13-*.jar")):
        raise ServiceError(f"no kafka_2.13 jar in {lib} after the Maven fetch")
    marker.write_text(version)
    return lib


def _cluster_id() -> str:
    """A random cluster id, as Kafka's ``Uuid.randomUuid`` makes them.

    Like Kafka, never one starting with ``-``: the storage tool would read it as an option
    (1 id in 64 would, and the format fails with "expected one argument").
    """
    while True:
        cluster_id = base64.urlsafe_b64encode(os.urandom(16)).decode().rstrip("=")
        if not cluster_id.startswith("-"):
            return cluster_id


@dataclass
class LocalKafka:
    """One broker+controller. Ports default to free ones; ``data_dir`` to a temp folder.

    ``start()`` formats storage on first use, launches the JVM and waits until a metadata
    request succeeds. ``stop()`` sends SIGTERM (controlled shutdown), then SIGKILL.
    ``kill()`` is SIGKILL at once, for fault tests; ``start()`` again reuses the data.
    """

    port: int = 0
    controller_port: int = 0
    data_dir: Path | None = None
    version: str = KAFKA_VERSION
    heap: str = "512m"
    extra_properties: dict[str, str] = field(default_factory=dict)
    _proc: subprocess.Popen[bytes] | None = field(default=None, init=False, repr=False)
    _tmp: tempfile.TemporaryDirectory[str] | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        self.port = self.port or free_port()
        self.controller_port = self.controller_port or free_port()
        if self.data_dir is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="chargify-kafka-")
            self.data_dir = Path(self._tmp.name)
        self.data_dir = Path(self.data_dir).resolve()

    @property
    def bootstrap_servers(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def log_file(self) -> Path:
        assert self.data_dir is not None
        return self.data_dir / "broker.log"

    def _write_config(self) -> tuple[Path, Path]:
        assert self.data_dir is not None
        self.data_dir.mkdir(parents=True, exist_ok=True)
        props = {
            "process.roles": "broker,controller",
            "node.id": "1",
            "controller.quorum.voters": f"1@127.0.0.1:{self.controller_port}",
            "listeners": (
                f"PLAINTEXT://127.0.0.1:{self.port},CONTROLLER://127.0.0.1:{self.controller_port}"
            ),
            "advertised.listeners": f"PLAINTEXT://127.0.0.1:{self.port}",
            "controller.listener.names": "CONTROLLER",
            "inter.broker.listener.name": "PLAINTEXT",
            "listener.security.protocol.map": "PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT",
            "log.dirs": str(self.data_dir / "logs"),
            "num.partitions": "1",
            "offsets.topic.replication.factor": "1",
            "offsets.topic.num.partitions": "10",
            "transaction.state.log.replication.factor": "1",
            "transaction.state.log.min.isr": "1",
            "share.coordinator.state.topic.replication.factor": "1",
            "share.coordinator.state.topic.min.isr": "1",
            "group.initial.rebalance.delay.ms": "0",
            "num.network.threads": "2",
            "num.io.threads": "2",
            "auto.create.topics.enable": "false",
            # After a SIGKILL the controller refuses the restarted broker
            # (DUPLICATE_BROKER_REGISTRATION) until the old session expires: 9 s by
            # default. One local node needs no such grace.
            "broker.session.timeout.ms": "3000",
            "broker.heartbeat.interval.ms": "1000",
            # Durability on one node: every write is fsynced-by-OS-page-cache like any
            # single broker; min.insync.replicas=1 is all one node can offer.
            "min.insync.replicas": "1",
        }
        props.update(self.extra_properties)
        config = self.data_dir / "server.properties"
        config.write_text("".join(f"{k}={v}\n" for k, v in props.items()))
        log4j = self.data_dir / "log4j2.xml"
        log4j.write_text(
            resources.files("chargify_stream.local").joinpath("log4j2.xml").read_text()
        )
        return config, log4j

    def start(self, timeout: float = 60.0) -> None:
        """Start the broker (formatting storage on first start) and wait until it answers."""
        if self._proc is not None and self._proc.poll() is None:
            return
        java = shutil.which("java")
        if java is None:
            raise ServiceError("java is needed to run Kafka; run scripts/install")
        lib = ensure_kafka_jars(self.version)
        config, log4j = self._write_config()
        classpath = f"{lib}/*"
        jvm = [java, f"-Dlog4j2.configurationFile={log4j}", "-cp", classpath]
        assert self.data_dir is not None
        if not (self.data_dir / "logs" / "meta.properties").exists():
            fmt = subprocess.run(
                [
                    *jvm,
                    "kafka.tools.StorageTool",
                    "format",
                    "-t",
                    _cluster_id(),
                    "-c",
                    str(config),
                    "--ignore-formatted",
                ],
                capture_output=True,
                text=True,
                check=False,
            )
            if fmt.returncode != 0:
                raise ServiceError(f"formatting Kafka storage failed:\n{fmt.stdout}{fmt.stderr}")
        heap = [f"-Xms{self.heap}", "-Xmx1g", "-XX:+UseG1GC", "-XX:TieredStopAtLevel=1"]
        logf = open(self.log_file, "ab")  # noqa: SIM115 - owned by the child process
        started = time.monotonic()
        self._proc = subprocess.Popen(
            [*jvm[:1], *heap, *jvm[1:], "kafka.Kafka", str(config)],
            stdout=logf,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        logf.close()
        self._wait_ready(timeout)
        log.info(
            "Kafka %s ready on %s in %.1fs",
            self.version,
            self.bootstrap_servers,
            time.monotonic() - started,
        )

    def _wait_ready(self, timeout: float) -> None:
        from confluent_kafka.admin import AdminClient

        deadline = time.monotonic() + timeout
        admin = AdminClient({"bootstrap.servers": self.bootstrap_servers, "log_level": 0})
        while time.monotonic() < deadline:
            if self._proc is not None and self._proc.poll() is not None:
                raise ServiceError(
                    f"Kafka exited with code {self._proc.returncode} at start; "
                    f"last log lines:\n{self._tail()}"
                )
            try:
                md = admin.list_topics(timeout=1.0)
                if md.brokers:
                    return
            except Exception:
                pass
            time.sleep(0.2)
        self.kill()
        raise ServiceError(f"Kafka not ready after {timeout:.0f}s; last log lines:\n{self._tail()}")

    def _tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_file.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def stop(self, timeout: float = 20.0) -> None:
        """Controlled shutdown (SIGTERM), then SIGKILL after ``timeout`` seconds."""
        _terminate(self._proc, timeout)
        self._proc = None

    def kill(self) -> None:
        """SIGKILL the broker at once (the data survives for a restart)."""
        _terminate(self._proc, 0)
        self._proc = None

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def cleanup(self) -> None:
        self.stop()
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None


def _terminate(proc: subprocess.Popen[bytes] | None, timeout: float) -> None:
    if proc is None or proc.poll() is not None:
        return
    if timeout > 0:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout)
            return
        except subprocess.TimeoutExpired:
            log.warning("pid %s did not stop in %.0fs; killing it", proc.pid, timeout)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
