"""The whole pipeline as real processes, for end-to-end and fault-injection tests.

``Pipeline`` starts a gateway, N processors and M sinks (``chargify-stream <stage>``, the
way the README runs them) against one test's settings, posts signed webhooks the way
Chargify does, and waits for Postgres to reach an expected state.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable
from typing import Any

import httpx
import psycopg

from chargify_stream.base.settings import Settings
from chargify_stream.ingest.signature import sign
from chargify_stream.local.ports import free_port
from tests.conftest import TEST_SHARED_KEY
from tests.stages import Stage

FORM = "application/x-www-form-urlencoded"


class Pipeline:
    def __init__(
        self,
        settings: Settings,
        start_stage: Callable[..., Stage],
        *,
        processors: int = 1,
        sinks: int = 1,
    ) -> None:
        self.settings = settings
        self._start_stage = start_stage
        self._instances = itertools.count(1)
        self.gateway = start_stage("gateway", settings)
        self.processors = [self._start("processor") for _ in range(processors)]
        self.sinks = [self._start("sink") for _ in range(sinks)]
        self.base = f"http://127.0.0.1:{settings.gateway_port}"
        self.client = httpx.Client(base_url=self.base, timeout=30)
        self.gateway.wait_http_ready(f"{self.base}/readyz")

    def _start(self, name: str, settings: Settings | None = None) -> Stage:
        """One more worker of a stage; several on one host need their own ports and
        Faust data folder, as an operator would give them."""
        if settings is None:
            n = next(self._instances)
            settings = self.settings.model_copy(
                update={
                    "processor_web_port": free_port(),
                    "sink_metrics_port": free_port(),
                    "processor_data_dir": f"{self.settings.processor_data_dir}-{n}",
                }
            )
        return self._start_stage(name, settings)

    def restart(self, stage: Stage) -> Stage:
        """Start a new process for the same stage and instance (after a kill or stop)."""
        new = self._start(stage.name, stage.settings)
        for group in (self.processors, self.sinks):
            if stage in group:
                group[group.index(stage)] = new
        return new

    def post(self, body: bytes, *, key: str = TEST_SHARED_KEY) -> int:
        """POST one signed webhook; return the HTTP status (599 when no answer came)."""
        try:
            response = self.client.post(
                "/webhooks/chargify",
                content=body,
                headers={
                    "Content-Type": FORM,
                    "X-Chargify-Webhook-Signature-Hmac-Sha-256": sign(key.encode(), body),
                },
            )
        except httpx.HTTPError:
            return 599
        return response.status_code

    def post_until_accepted(self, body: bytes, timeout: float = 60.0) -> int:
        """POST like Chargify's retries do, until a 200; return the number of attempts."""
        deadline = time.monotonic() + timeout
        attempts = 0
        while time.monotonic() < deadline:
            attempts += 1
            if self.post(body) == 200:
                return attempts
            time.sleep(0.5)
        raise AssertionError(f"webhook not accepted within {timeout}s")

    def query(self, sql: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        with psycopg.connect(self.settings.database_dsn(), autocommit=True) as conn:
            return conn.execute(sql.encode(), params).fetchall()

    def wait_for(
        self, sql: str, expected: Any, *, params: tuple[Any, ...] = (), timeout: float = 60.0
    ) -> None:
        """Poll ``sql`` until it returns ``expected``; fail with the last result."""
        deadline = time.monotonic() + timeout
        last: Any = None
        while time.monotonic() < deadline:
            try:
                last = self.query(sql, params)
            except psycopg.OperationalError as exc:  # the database may be restarting
                last = exc
            if last == expected:
                return
            time.sleep(0.25)
        raise AssertionError(f"{sql}\n  expected {expected!r}\n  last     {last!r}")

    def close(self) -> None:
        self.client.close()
