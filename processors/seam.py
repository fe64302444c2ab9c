"""Every name of faust-streaming and mode-streaming the processor uses, in one place.

The processor uses Faust as its application shell only (see :mod:`processors.worker`);
its Kafka work is done by librdkafka (:mod:`processors.pipeline`). No private name of
faust, mode or aiokafka is used anywhere in the project, and aiokafka is not used at all.
The touchpoints, all public, and why:

- ``faust.App`` with ``App.BootStrategy`` replaced by a subclass of
  ``faust.app.base.BootStrategy`` with ``enable_kafka = False`` (the switch its source
  documents for subclasses): the worker then starts no aiokafka consumer or producer, no
  conductor and no tables; only the web server and sensors. Were that switch to stop
  working, Faust's consumer would join the group ``PROCESSOR_APP_ID`` beside the
  pipeline's consumer and break it (different protocols in one group).
- ``App.page`` and ``faust.web.View``/``Request``/``Response``: the ``/metrics`` page.
- ``faust.Worker(app, *services, loglevel=, quiet=, override_logging=)`` and its
  ``execute_from_commandline()``, which ends with ``SystemExit``: signal handling and a
  graceful stop of the app and of the pipeline's service.
- ``Worker.spinner`` (set to ``None``): the start-up spinner, which writes terminal escape
  sequences into a log that is no terminal.
- ``mode.Service`` with ``on_start``/``on_stop``: the pipeline's thread as a service
  (:class:`ThreadService`).

``tests/unit/test_seam.py`` pins the versions (faust-streaming 0.15.3, mode-streaming
0.7.1, aiokafka 0.14.0, as ``pyproject.toml``) and the source of ``BootStrategy``, and
fails with instructions when either changes; ``tests/integration/test_seam.py`` runs a
real worker of this app against the real broker and checks the contract above.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any

import faust
from faust.app.base import BootStrategy
from faust.web import Request, Response, View
from mode import Service

from chargify_stream.base.settings import Settings
from chargify_stream.processors import lifecycle
from chargify_stream.processors.metrics import CONTENT_TYPE, ProcessorMetrics

__all__ = ["NoKafka", "ProcessorApp", "ThreadService", "Worker", "build_app", "execute"]

log = logging.getLogger(__name__)

Worker = faust.Worker


class NoKafka(BootStrategy):
    """Start no Kafka service of Faust's (consumer, producer, conductor, tables)."""

    enable_kafka = False


class ProcessorApp(faust.App):
    """A Faust app whose worker runs no Kafka service of its own."""

    BootStrategy = NoKafka


def execute(worker: Any) -> int:
    """Run ``worker`` until it stops; its exit status."""
    # Faust's start-up spinner writes a terminal escape sequence (show cursor) even when
    # its output is no terminal, into the log.
    worker.spinner = None
    try:
        worker.execute_from_commandline()
    except SystemExit as done:  # how mode's worker always ends
        return done.code if isinstance(done.code, int) else 1
    return 0


def build_app(settings: Settings, metrics: ProcessorMetrics) -> faust.App:
    """The processor's Faust app: no Kafka services, a web server with the metrics page."""
    app = ProcessorApp(
        settings.processor_app_id,
        broker=[f"kafka://{s}" for s in settings.kafka_bootstrap_servers.split(",")],
        datadir=settings.processor_data_dir,
        web_host=settings.metrics_host,
        web_bind=settings.metrics_host,
        web_port=settings.processor_web_port,
        web_tables_enabled=False,
        web_graph_enabled=False,
    )

    @app.page("/metrics")
    async def metrics_page(self: View, request: Request) -> Response:
        return self.bytes(metrics.render(), content_type=CONTENT_TYPE)

    return app


class ThreadService(Service):
    """Runs ``work(stop)`` in a thread while the worker runs; sets ``stop`` when it stops.

    ``on_failure`` is called (from the thread) if ``work`` raises before the stop; a stop
    not done ``stop_timeout`` seconds after it began exits the process
    (:func:`processors.lifecycle.exit_if_still_running`).
    """

    def __init__(
        self,
        work: Callable[[threading.Event], None],
        on_failure: Callable[[BaseException], None],
        stop_timeout: float,
    ) -> None:
        super().__init__()
        self._work = work
        self._on_failure = on_failure
        self._stop_timeout = stop_timeout
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="pipeline", daemon=True)

    def _run(self) -> None:
        try:
            self._work(self._stop)
        except BaseException as exc:
            if not self._stop.is_set():
                self._on_failure(exc)
            else:
                log.exception("the pipeline failed while stopping")

    async def on_start(self) -> None:
        self._thread.start()

    async def on_stop(self) -> None:
        self._stop.set()
        call_off = lifecycle.exit_if_still_running(self._stop_timeout)
        await lifecycle.join(self._thread)
        call_off()
