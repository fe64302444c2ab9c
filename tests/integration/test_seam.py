"""``processors.seam`` against the real library: a real Faust worker of the processor's
app, on the real broker, with a stand-in for the pipeline in its thread service.

The contract (see the seam's docstring): the worker serves the metrics page, starts none
of Faust's Kafka services (no consumer joins a group, no topic is declared), runs the
service's work in its thread, and on SIGTERM stops it and exits 0.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest
from confluent_kafka.admin import AdminClient

from chargify_stream.base.settings import Settings

pytestmark = pytest.mark.integration

_WORKER = textwrap.dedent(
    """
    import threading
    from chargify_stream.base.logs import setup_logging
    from chargify_stream.base.settings import load_settings
    from chargify_stream.processors import seam
    from chargify_stream.processors.metrics import ProcessorMetrics

    setup_logging("INFO")
    settings = load_settings()
    metrics = ProcessorMetrics()

    def work(stop: threading.Event) -> None:
        metrics.aborted.inc(7)
        print("working", flush=True)
        stop.wait()
        print("work stopped", flush=True)

    def failed(exc: BaseException) -> None:
        print("failed", exc, flush=True)

    app = seam.build_app(settings, metrics)
    worker = seam.Worker(app, seam.ThreadService(work, failed, 10.0), quiet=True,
                         override_logging=False, loglevel="info")
    print("exit", seam.execute(worker), flush=True)
    """
)


def test_a_real_worker_keeps_the_contract(
    make_settings: Callable[..., Settings], tmp_path: Path
) -> None:
    settings = make_settings()
    log = tmp_path / "worker.log"
    with open(log, "wb") as out:
        child = subprocess.Popen(
            [sys.executable, "-c", _WORKER],
            env={**os.environ, **settings.as_env(), "PYTHONUNBUFFERED": "1"},
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        url = f"http://127.0.0.1:{settings.processor_web_port}/metrics"
        deadline = time.monotonic() + 60
        page = ""
        while time.monotonic() < deadline and "processor_transactions_aborted_total" not in page:
            try:
                page = httpx.get(url, timeout=1).text
            except httpx.HTTPError:
                time.sleep(0.2)
        assert "processor_transactions_aborted_total 7.0" in page, log.read_text()
        assert "working" in log.read_text()
        time.sleep(3)  # long enough for a Faust consumer to join, were one started

        admin = AdminClient({"bootstrap.servers": settings.kafka_bootstrap_servers})
        groups = admin.list_consumer_groups().result(timeout=10).valid
        assert settings.processor_app_id not in {g.group_id for g in groups}
        topics = admin.list_topics(timeout=10).topics
        assert not [t for t in topics if t.startswith(settings.processor_app_id)]

        child.send_signal(signal.SIGTERM)
        assert child.wait(30) == 0, log.read_text()
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    text = log.read_text()
    assert "work stopped" in text and "exit 0" in text, text
    assert "failed" not in text
