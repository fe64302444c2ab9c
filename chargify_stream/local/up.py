"""``chargify-stream up``: the whole pipeline on one laptop, in one command.

Starts Kafka and Postgres on the addresses the settings name (by default the local
defaults every stage points at), migrates the database, then runs the gateway, a
processor and a sink as child processes, and prints where to look. Ctrl-C (or SIGTERM)
stops the stages first, then the services. Data survives in ``--data-dir``.

Without ``CHARGIFY_SHARED_KEYS`` a random local key is made once and kept in the data
folder (mode 600), so ``chargify-stream sign`` and the gateway agree on it.
"""

from __future__ import annotations

import secrets
import shutil
import signal
import sys
import time
from pathlib import Path
from urllib.parse import urlsplit

from chargify_stream.base.errors import ConfigError, ServiceError
from chargify_stream.base.kafka_admin import ensure_pipeline_topics
from chargify_stream.base.settings import Settings, load_settings
from chargify_stream.local.kafka import LocalKafka
from chargify_stream.local.launch import StageProcess, stop_all
from chargify_stream.local.postgres import LocalPostgres
from chargify_stream.sink.migrate import migrate

LOOPBACK = {"127.0.0.1", "localhost", "::1"}
STAGES = ("gateway", "processor", "sink")


def _local_port(address: str, variable: str) -> int:
    host, _, port = address.rpartition(":")
    if host.strip("[]") not in LOOPBACK or not port.isdigit():
        raise ConfigError(f"{variable} must point at 127.0.0.1 for `up` (it starts that service)")
    return int(port)


def shared_key(data_dir: Path) -> str:
    path = data_dir / "shared-key"
    if not path.exists():
        data_dir.mkdir(parents=True, exist_ok=True)
        path.write_text(secrets.token_hex(16))
        path.chmod(0o600)
    return path.read_text().strip()


def run(settings: Settings, *, data_dir: str, fresh: bool = False) -> int:
    root = Path(data_dir).resolve()
    if fresh and root.exists():
        shutil.rmtree(root)
    root.mkdir(parents=True, exist_ok=True)
    if settings.kafka_security_protocol != "PLAINTEXT":
        # The broker `up` starts listens in PLAINTEXT on loopback; credentials meant for
        # another cluster would only make every stage fail to log in.
        raise ConfigError(
            "KAFKA_SECURITY_PROTOCOL must be PLAINTEXT for `up` (it starts a local broker "
            "without TLS or SASL); unset it, or run the stages against your cluster"
        )
    if "," in settings.kafka_bootstrap_servers:
        raise ConfigError("KAFKA_BOOTSTRAP_SERVERS must name one local broker for `up`")
    kafka_port = _local_port(settings.kafka_bootstrap_servers, "KAFKA_BOOTSTRAP_SERVERS")
    url = urlsplit(settings.database_dsn())
    pg_port = _local_port(f"{url.hostname}:{url.port or 5432}", "DATABASE_URL")
    dbname = url.path.lstrip("/") or "chargify"

    env_overrides: dict[str, str] = {"PROCESSOR_DATA_DIR": str(root / "processor")}
    generated_key = False
    if not settings.shared_keys:
        env_overrides["CHARGIFY_SHARED_KEYS"] = shared_key(root)
        generated_key = True
        settings = load_settings(chargify_shared_keys=env_overrides["CHARGIFY_SHARED_KEYS"])

    kafka = LocalKafka(port=kafka_port, controller_port=kafka_port + 1, data_dir=root / "kafka")
    postgres = LocalPostgres(
        port=pg_port, data_dir=root / "postgres", superuser=url.username or "postgres"
    )
    children: list[StageProcess] = []
    stopping = False

    def on_signal(signum: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        print(f"starting Kafka on 127.0.0.1:{kafka_port} ...", flush=True)
        kafka.start()
        print(f"starting Postgres on 127.0.0.1:{pg_port} ...", flush=True)
        postgres.start()
        postgres.create_database(dbname)
        migrate(settings.database_dsn())
        ensure_pipeline_topics(settings)
        logs = root / "logs"
        logs.mkdir(exist_ok=True)
        for stage in STAGES:
            process = StageProcess.stage(stage, None, logs / f"{stage}.log", env=env_overrides)
            children.append(process.start())
        http = f"http://{settings.gateway_host}:{settings.gateway_port}"
        database = f"postgresql://{url.username or 'postgres'}@127.0.0.1:{pg_port}/{dbname}"
        key_from = root / "shared-key" if generated_key else "CHARGIFY_SHARED_KEYS"
        print(
            "\nchargify-stream is up.\n"
            f"  webhook URL:  {http}/webhooks/chargify\n"
            f"  health:       {http}/readyz\n"
            f"  metrics:      {http}/metrics\n"
            f"  Kafka:        {settings.kafka_bootstrap_servers}\n"
            f"  Postgres:     {database}\n"
            f"  stage logs:   {logs}/{{gateway,processor,sink}}.log\n"
            f"  shared key:   {key_from}\n"
            "Ctrl-C stops everything.",
            flush=True,
        )
        while not stopping:
            for process in children:
                if not process.running:
                    raise ServiceError(
                        f"the {process.name} stage exited with code {process.returncode};"
                        f" see {process.log_path}"
                    )
            time.sleep(0.5)
        print("stopping ...", flush=True)
        return 0
    finally:
        for error in stop_all(children[::-1]):
            print(error, file=sys.stderr, flush=True)
        postgres.stop()
        kafka.stop()
