"""A real single-node Apache Kafka (KRaft mode) run from Maven Central jars.

There is no Docker engine on the machines this project is developed and tested on, so the
broker is fetched with Maven (``org.apache.kafka:kafka_2.13`` and its runtime dependencies)
into a cache outside the work tree, and run with ``java``. The cache is keyed by version, so
a second run, or a fresh clone on the same machine, starts offline.

Kafka 4.x's Maven artifacts declare log4j but no slf4j binding: without
``log4j-slf4j-impl`` a broker that dies at start prints nothing. We add it at the version
of log4j-core that Kafka pulls in, and a console log4j2 config.

Besides the plain single node, :class:`LocalKafka` can listen with SASL_SSL (SCRAM over
TLS, as managed clusters do: see :class:`Scram`), and :class:`LocalKafkaCluster` runs
three nodes that replicate each other, for failover tests.

Why one module of about 480 lines: fetching the jars, the broker configuration (plain,
SASL_SSL with its certificates and SCRAM users, three nodes) and the process lifecycle
describe one local broker; the shared launch and wait-until-ready code is already in
:mod:`chargify_stream.local.launch`.
"""

from __future__ import annotations

import base64
import logging
import os
import shutil
import subprocess
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from chargify_stream.base.errors import ServiceError
from chargify_stream.local.launch import LocalService, spawn
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


@dataclass(frozen=True)
class Scram:
    """A SASL_SSL listener: SCRAM logins over TLS, with a throwaway CA made at start.

    ``users`` (name -> password) are created when the storage is formatted, the only
    time a KRaft cluster takes SCRAM users from outside; so is the broker's own user,
    which it logs in with to itself (transactions go through its own listener). The
    storage tool splits its argument on commas: no commas in passwords.
    """

    users: tuple[tuple[str, str], ...] = (("chargify", "chargify-secret"),)
    mechanism: str = "SCRAM-SHA-512"
    broker_user: tuple[str, str] = ("broker", "broker-secret")

    def __post_init__(self) -> None:
        for name, password in (*self.users, self.broker_user):
            if "," in password or "," in name:
                raise ValueError("SCRAM names and passwords cannot contain commas")


def make_certificates(folder: Path) -> tuple[Path, Path]:
    """A CA and a broker certificate for ``localhost`` and ``127.0.0.1``, with openssl.

    Returns ``(ca.pem, broker-keystore.pem)``: the CA for clients, and the broker's key
    (PKCS#8, unencrypted) followed by its certificate, which Kafka reads as a PEM keystore.
    The extensions are those strict verifiers ask for, so clients keep every check on.
    """
    openssl = shutil.which("openssl")
    if openssl is None:
        raise ServiceError("openssl is needed to make the test broker's certificates")
    folder.mkdir(parents=True, exist_ok=True)
    ca_key, ca, key, csr, cert = (
        folder / n for n in ("ca.key", "ca.pem", "broker.key", "broker.csr", "broker.pem")
    )
    extensions = folder / "broker.ext"
    extensions.write_text(
        "basicConstraints=critical,CA:FALSE\n"
        "keyUsage=critical,digitalSignature,keyEncipherment\n"
        "extendedKeyUsage=serverAuth,clientAuth\n"
        "subjectAltName=DNS:localhost,IP:127.0.0.1\n"
        "subjectKeyIdentifier=hash\n"
        "authorityKeyIdentifier=keyid,issuer\n"
    )
    steps = [
        [openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", ca_key,
         "-out", ca, "-days", "7", "-subj", "/CN=chargify-stream local CA",
         "-addext", "basicConstraints=critical,CA:TRUE",
         "-addext", "keyUsage=critical,keyCertSign,cRLSign"],
        [openssl, "req", "-newkey", "rsa:2048", "-nodes", "-keyout", key, "-out", csr,
         "-subj", "/CN=localhost"],
        [openssl, "x509", "-req", "-in", csr, "-CA", ca, "-CAkey", ca_key,
         "-CAcreateserial", "-out", cert, "-days", "7", "-extfile", extensions],
    ]  # fmt: skip
    for step in steps:
        done = subprocess.run([str(a) for a in step], capture_output=True, text=True, check=False)
        if done.returncode != 0:
            raise ServiceError(f"openssl failed: {done.stderr[-2000:]}")
    keystore = folder / "broker-keystore.pem"
    keystore.write_text(key.read_text() + cert.read_text())
    keystore.chmod(0o600)
    return ca, keystore


@dataclass
class LocalKafka(LocalService):
    """One broker+controller. Ports default to free ones; ``data_dir`` to a temp folder.

    ``start()`` formats storage on first use, launches the JVM and waits until a metadata
    request succeeds. ``stop()`` sends SIGTERM (controlled shutdown), then SIGKILL.
    ``kill()`` is SIGKILL at once, for fault tests; ``start()`` again reuses the data.

    With ``scram`` the client listener is SASL_SSL (see :class:`Scram`); clients connect
    with :meth:`client_config` or :meth:`settings_overrides`. ``node_id``, ``voters``,
    ``cluster_id`` and ``replicas`` make it one node of a :class:`LocalKafkaCluster`.
    """

    service_name = "Kafka"

    port: int = 0
    controller_port: int = 0
    data_dir: Path | None = None
    version: str = KAFKA_VERSION
    heap: str = "512m"
    extra_properties: dict[str, str] = field(default_factory=dict)
    scram: Scram | None = None
    node_id: int = 1
    voters: str = ""  # controller.quorum.voters; default: this node alone
    cluster_id: str = ""
    replicas: int = 1  # the cluster's size: internal topics are replicated this many times
    _proc: subprocess.Popen[bytes] | None = field(default=None, init=False, repr=False)
    _tmp: tempfile.TemporaryDirectory[str] | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        self.port = self.port or free_port()
        self.controller_port = self.controller_port or free_port()
        if self.data_dir is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="chargify-kafka-")
            self.data_dir = Path(self._tmp.name)
        self.data_dir = Path(self.data_dir).resolve()
        self.voters = self.voters or f"{self.node_id}@127.0.0.1:{self.controller_port}"

    @property
    def bootstrap_servers(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def ca_location(self) -> Path:
        """The CA file clients trust (SASL_SSL only; made at the first start)."""
        assert self.data_dir is not None
        return self.data_dir / "tls" / "ca.pem"

    def settings_overrides(self, user: int = 0, password: str | None = None) -> dict[str, str]:
        """The ``KAFKA_*`` settings that reach this broker (as ``users[user]`` if SASL)."""
        out = {"kafka_bootstrap_servers": self.bootstrap_servers}
        if self.scram is not None:
            name, secret = self.scram.users[user]
            out |= {
                "kafka_security_protocol": "SASL_SSL",
                "kafka_sasl_mechanism": self.scram.mechanism,
                "kafka_sasl_username": name,
                "kafka_sasl_password": secret if password is None else password,
                "kafka_ssl_ca_location": str(self.ca_location),
            }
        return out

    def client_config(self) -> dict[str, Any]:
        """A librdkafka connection config for this broker (the first SCRAM user if SASL)."""
        conf: dict[str, Any] = {"bootstrap.servers": self.bootstrap_servers}
        if self.scram is not None:
            name, secret = self.scram.users[0]
            conf |= {
                "security.protocol": "sasl_ssl",
                "sasl.mechanism": self.scram.mechanism,
                "sasl.username": name,
                "sasl.password": secret,
                "ssl.ca.location": str(self.ca_location),
            }
        return conf

    @property
    def log_file(self) -> Path:
        assert self.data_dir is not None
        return self.data_dir / "broker.log"

    def _write_config(self) -> tuple[Path, Path]:
        assert self.data_dir is not None
        self.data_dir.mkdir(parents=True, exist_ok=True)
        listener = "PLAINTEXT" if self.scram is None else "SASL_SSL"
        replicas, min_isr = str(self.replicas), str(min(self.replicas, 2))
        props = {
            "process.roles": "broker,controller",
            "node.id": str(self.node_id),
            "controller.quorum.voters": self.voters,
            "listeners": (
                f"{listener}://127.0.0.1:{self.port},CONTROLLER://127.0.0.1:{self.controller_port}"
            ),
            "advertised.listeners": f"{listener}://127.0.0.1:{self.port}",
            "controller.listener.names": "CONTROLLER",
            "inter.broker.listener.name": listener,
            "listener.security.protocol.map": f"{listener}:{listener},CONTROLLER:PLAINTEXT",
            "log.dirs": str(self.data_dir / "logs"),
            "num.partitions": "1",
            "offsets.topic.replication.factor": replicas,
            "offsets.topic.num.partitions": "10",
            "transaction.state.log.replication.factor": replicas,
            "transaction.state.log.min.isr": min_isr,
            "share.coordinator.state.topic.replication.factor": replicas,
            "share.coordinator.state.topic.min.isr": min_isr,
            "group.initial.rebalance.delay.ms": "0",
            "num.network.threads": "2",
            "num.io.threads": "2",
            "auto.create.topics.enable": "false",
            # After a SIGKILL the controller refuses the restarted broker
            # (DUPLICATE_BROKER_REGISTRATION) until the old session expires: 9 s by
            # default. One local node needs no such grace.
            "broker.session.timeout.ms": "3000",
            "broker.heartbeat.interval.ms": "1000",
            # An acks=all write is on this many brokers before it is acknowledged: all
            # one node can offer, and two of three (one may be lost) in a cluster.
            "min.insync.replicas": min_isr,
            "default.replication.factor": replicas,
        }
        if self.scram is not None:
            props |= self._sasl_ssl_properties(self.scram)
        props.update(self.extra_properties)
        config = self.data_dir / "server.properties"
        config.write_text("".join(f"{k}={v}\n" for k, v in props.items()))
        log4j = self.data_dir / "log4j2.xml"
        log4j.write_text(
            resources.files("chargify_stream.local").joinpath("log4j2.xml").read_text()
        )
        return config, log4j

    def _sasl_ssl_properties(self, scram: Scram) -> dict[str, str]:
        assert self.data_dir is not None
        if not self.ca_location.exists():
            make_certificates(self.ca_location.parent)
        keystore = self.ca_location.parent / "broker-keystore.pem"
        name, password = scram.broker_user
        mechanism = scram.mechanism.lower()
        return {
            "sasl.enabled.mechanisms": scram.mechanism,
            "sasl.mechanism.inter.broker.protocol": scram.mechanism,
            # Without one per enabled mechanism the broker exits at start.
            f"listener.name.sasl_ssl.{mechanism}.sasl.jaas.config": (
                "org.apache.kafka.common.security.scram.ScramLoginModule required "
                f'username="{name}" password="{password}";'
            ),
            "ssl.keystore.type": "PEM",
            "ssl.keystore.location": str(keystore),
            "ssl.truststore.type": "PEM",
            "ssl.truststore.location": str(self.ca_location),
        }

    def _format_arguments(self) -> list[str]:
        """The storage tool's ``--add-scram`` arguments: every SCRAM user of the cluster."""
        if self.scram is None:
            return []
        out = []
        for name, password in (self.scram.broker_user, *self.scram.users):
            out += ["--add-scram", f"{self.scram.mechanism}=[name={name},password={password}]"]
        return out

    def start(self, timeout: float = 60.0) -> None:
        """Start the broker (formatting storage on first start) and wait until it answers."""
        if self._proc is not None and self._proc.poll() is None:
            return
        started = time.monotonic()
        self.launch()
        self.wait_ready(timeout)
        log.info(
            "Kafka %s ready on %s in %.1fs",
            self.version,
            self.bootstrap_servers,
            time.monotonic() - started,
        )

    def launch(self) -> None:
        """Format storage on first use and start the JVM, without waiting for it.

        The nodes of a cluster are all launched before any is waited for: a node is
        ready only once a majority of the controllers run.
        """
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
                    self.cluster_id or _cluster_id(),
                    "-c",
                    str(config),
                    "--ignore-formatted",
                    *self._format_arguments(),
                ],
                capture_output=True,
                text=True,
                check=False,
            )
            if fmt.returncode != 0:
                raise ServiceError(f"formatting Kafka storage failed:\n{fmt.stdout}{fmt.stderr}")
        heap = [f"-Xms{self.heap}", "-Xmx1g", "-XX:+UseG1GC", "-XX:TieredStopAtLevel=1"]
        self._proc = spawn([*jvm[:1], *heap, *jvm[1:], "kafka.Kafka", str(config)], self.log_file)

    def wait_ready(self, timeout: float = 60.0) -> None:
        """Wait until the broker answers a metadata request (and, in a cluster, the
        controllers have registered it)."""
        from confluent_kafka.admin import AdminClient

        admin = AdminClient({**self.client_config(), "log_level": 0})

        def registered() -> bool:
            try:
                return self.node_id in admin.list_topics(timeout=1.0).brokers
            except Exception:
                return False

        self._wait_until(registered, timeout, "a metadata answer", interval=0.2)


class LocalKafkaCluster:
    """``size`` nodes (each broker and controller) replicating each other, in KRaft mode.

    Internal topics are replicated to every node, and ``min.insync.replicas`` is 2: an
    ``acks=all`` write is on two brokers before it is acknowledged, so one node can be
    killed (:meth:`node`, then ``kill()`` and ``start()``) without losing one.
    """

    def __init__(
        self,
        size: int = 3,
        *,
        data_dir: Path | None = None,
        heap: str = "512m",
        extra_properties: dict[str, str] | None = None,
    ):
        self._tmp: tempfile.TemporaryDirectory[str] | None = None
        if data_dir is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="chargify-kafka-cluster-")
            data_dir = Path(self._tmp.name)
        ports = [(free_port(), free_port()) for _ in range(size)]
        voters = ",".join(f"{i}@127.0.0.1:{c}" for i, (_, c) in enumerate(ports, start=1))
        cluster_id = _cluster_id()
        self.nodes = [
            LocalKafka(
                port=port,
                controller_port=controller,
                data_dir=Path(data_dir) / f"node-{i}",
                heap=heap,
                extra_properties=dict(extra_properties or {}),
                node_id=i,
                voters=voters,
                cluster_id=cluster_id,
                replicas=size,
            )
            for i, (port, controller) in enumerate(ports, start=1)
        ]

    @property
    def bootstrap_servers(self) -> str:
        return ",".join(node.bootstrap_servers for node in self.nodes)

    def node(self, node_id: int) -> LocalKafka:
        return self.nodes[node_id - 1]

    def start(self, timeout: float = 90.0) -> None:
        """Start every node that is not running, and wait until each one answers."""
        started = time.monotonic()
        for node in self.nodes:
            node.launch()
        for node in self.nodes:
            node.wait_ready(max(1.0, timeout - (time.monotonic() - started)))
        log.info(
            "Kafka cluster of %d ready on %s in %.1fs",
            len(self.nodes),
            self.bootstrap_servers,
            time.monotonic() - started,
        )

    def stop(self) -> None:
        """Controlled shutdown of every node at once (one by one, the last nodes would
        wait for a controller quorum that is already gone), SIGKILL after 20 s."""
        with ThreadPoolExecutor(len(self.nodes)) as pool:
            list(pool.map(LocalKafka.stop, self.nodes))

    def kill(self) -> None:
        """SIGKILL every node (the data survives for a restart)."""
        for node in self.nodes:
            node.kill()

    def cleanup(self) -> None:
        self.stop()
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None
