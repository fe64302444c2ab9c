"""A real PostgreSQL server from Debian's packages, on loopback, with its data in a folder.

``initdb`` and ``postgres`` refuse to run as root, and both developers and CI run as root:
when we are root, every server process drops to the ``postgres`` system user (which
Debian's package creates) and the data folder is handed to it.
"""

from __future__ import annotations

import glob
import logging
import os
import pwd
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import psycopg

from chargify_stream.base.errors import ServiceError
from chargify_stream.local.launch import LocalService, spawn
from chargify_stream.local.ports import free_port

log = logging.getLogger(__name__)


def find_bindir() -> Path:
    """The newest installed server's bin folder (``/usr/lib/postgresql/N/bin``)."""
    candidates = sorted(
        glob.glob("/usr/lib/postgresql/*/bin/postgres"),
        key=lambda p: (
            int(Path(p).parent.parent.name) if Path(p).parent.parent.name.isdigit() else 0
        ),
    )
    if candidates:
        return Path(candidates[-1]).parent
    found = shutil.which("postgres")
    if found:
        return Path(found).resolve().parent
    raise ServiceError("PostgreSQL server binaries not found; run scripts/install")


def _demote(user: str | None) -> Callable[[], None] | None:
    if user is None:
        return None
    pw = pwd.getpwnam(user)

    def drop() -> None:
        os.setgid(pw.pw_gid)
        os.setuid(pw.pw_uid)

    return drop


@dataclass
class LocalPostgres(LocalService):
    """One Postgres cluster on 127.0.0.1 with trust authentication for loopback.

    ``stop()`` asks for a *fast* shutdown (SIGINT: Postgres's SIGTERM is "smart" and waits
    for every client to leave, which a running sink never does), then SIGKILL after a
    timeout. ``kill()`` is SIGKILL at once; ``start()`` again recovers from the WAL.
    """

    service_name = "Postgres"
    # To the postmaster alone, which shuts its backends down.
    stop_signal = signal.SIGINT
    stop_whole_group = False

    port: int = 0
    data_dir: Path | None = None
    superuser: str = "postgres"
    settings: dict[str, str] = field(default_factory=dict)
    _proc: subprocess.Popen[bytes] | None = field(default=None, init=False, repr=False)
    _tmp: tempfile.TemporaryDirectory[str] | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        self.port = self.port or free_port()
        if self.data_dir is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="chargify-pg-")
            self.data_dir = Path(self._tmp.name)
        self.data_dir = Path(self.data_dir).resolve()
        self._run_as = "postgres" if os.geteuid() == 0 else None

    @property
    def pgdata(self) -> Path:
        assert self.data_dir is not None
        return self.data_dir / "pgdata"

    @property
    def log_file(self) -> Path:
        assert self.data_dir is not None
        return self.data_dir / "postgres.log"

    def dsn(self, dbname: str = "postgres") -> str:
        return f"postgresql://{self.superuser}@127.0.0.1:{self.port}/{dbname}"

    def _chown(self, path: Path) -> None:
        if self._run_as is not None:
            pw = pwd.getpwnam(self._run_as)
            os.chown(path, pw.pw_uid, pw.pw_gid)

    def _initdb(self, bindir: Path) -> None:
        assert self.data_dir is not None
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self._chown(self.data_dir)
        if self._run_as is not None:
            # The postgres user must be able to reach the folder through its parents.
            for parent in self.data_dir.parents:
                mode = parent.stat().st_mode
                if not mode & 0o001:
                    os.chmod(parent, mode | 0o001)
        proc = subprocess.run(
            [
                str(bindir / "initdb"),
                "-D",
                str(self.pgdata),
                "-U",
                self.superuser,
                "--auth=trust",
                "-E",
                "UTF8",
                "--locale=C.UTF-8",
                "--no-sync",
            ],
            capture_output=True,
            text=True,
            check=False,
            preexec_fn=_demote(self._run_as),
            cwd="/",
        )
        if proc.returncode != 0:
            raise ServiceError(f"initdb failed:\n{proc.stdout}{proc.stderr}")

    def start(self, timeout: float = 30.0) -> None:
        """Initialise the cluster on first start, launch it, wait until it accepts queries."""
        if self._proc is not None and self._proc.poll() is None:
            return
        bindir = find_bindir()
        if not (self.pgdata / "PG_VERSION").exists():
            self._initdb(bindir)
        options = {
            "listen_addresses": "127.0.0.1",
            "port": str(self.port),
            "unix_socket_directories": str(self.data_dir),
            "max_connections": "200",
            "shared_buffers": "128MB",
            **self.settings,
        }
        args = [str(bindir / "postgres"), "-D", str(self.pgdata)]
        for key, value in options.items():
            args += ["-c", f"{key}={value}"]
        if not self.log_file.exists():
            self.log_file.touch()
        self._chown(self.log_file)
        started = time.monotonic()
        self._proc = spawn(args, self.log_file, cwd="/", preexec_fn=_demote(self._run_as))
        self._wait_ready(timeout)
        log.info("Postgres ready on 127.0.0.1:%s in %.1fs", self.port, time.monotonic() - started)

    def _wait_ready(self, timeout: float) -> None:
        def answers() -> bool:
            try:
                with psycopg.connect(self.dsn(), connect_timeout=1) as conn:
                    conn.execute("select 1")
                return True
            except psycopg.OperationalError:
                return False

        self._wait_until(answers, timeout, "a query", tail_lines=20)

    def create_database(self, name: str) -> str:
        """Create database ``name`` (if missing) and return its DSN."""
        with psycopg.connect(self.dsn(), autocommit=True) as conn:
            exists = conn.execute(
                "select 1 from pg_database where datname = %s", (name,)
            ).fetchone()
            if not exists:
                conn.execute(f'create database "{name}"')  # name is ours, not user input
        return self.dsn(name)
